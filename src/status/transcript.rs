//! Status inference from Claude Code transcripts (PROTOCOL.md §5, the lowest
//! rank, source `jsonl`): a session whose last assistant turn asked for a tool
//! is `working`, anything else is `idle`.
//!
//! The reads are file I/O, so a shard never does them itself: it hands the
//! session's cwd to the one [`TranscriptReader`] thread and gets the answer back
//! through a callback (which posts it to the shard's inbox). A missing projects
//! directory or transcript is the normal case on most machines and is silent.

use std::fs::{self, File};
use std::io::{self, Read, Seek, SeekFrom};
use std::path::{Component, Path, PathBuf};
use std::thread::JoinHandle;
use std::time::SystemTime;

use crossbeam_channel::{Sender, TrySendError};
use serde_json::Value;

use crate::hook::Status;

/// How much of a transcript's end is read.
const TAIL_BYTES: u64 = 8 * 1024;

/// Requests waiting for the reader thread; beyond this, [`TranscriptReader::request`]
/// refuses rather than block a shard.
const QUEUE_CAPACITY: usize = 4096;

/// The directory names under `CLAUDE_PROJECTS_DIR` a cwd may have, in the order
/// they are tried: every `/`, `\` and `:` replaced by `-`; only `/` replaced;
/// the drive letter stripped (then all three replaced); the first variant with
/// a leading `-`. Duplicates are dropped, the first occurrence kept.
pub(crate) fn project_keys(cwd: &str) -> Vec<String> {
    let all = |s: &str| s.replace(['/', '\\', ':'], "-");
    let mut keys = Vec::with_capacity(4);
    let mut push = |k: String| {
        if !keys.contains(&k) {
            keys.push(k);
        }
    };

    let first = all(cwd);
    push(first.clone());
    push(cwd.replace('/', "-"));
    if let Some(rest) = strip_drive(cwd) {
        push(all(rest));
    }
    if !first.starts_with('-') {
        push(format!("-{first}"));
    }
    keys
}

/// `C:\Users\x` → `\Users\x`; `None` without a drive letter.
fn strip_drive(cwd: &str) -> Option<&str> {
    let b = cwd.as_bytes();
    (b.len() >= 2 && b[0].is_ascii_alphabetic() && b[1] == b':').then(|| &cwd[2..])
}

/// Whether `key` names exactly one entry inside the projects directory (not
/// empty, not `.` or `..`, no separator), so a client's cwd cannot point the
/// reader elsewhere.
fn is_single_component(key: &str) -> bool {
    let mut parts = Path::new(key).components();
    matches!(
        (parts.next(), parts.next()),
        (Some(Component::Normal(_)), None)
    )
}

/// The status a session in `cwd` is inferred to have: from the newest `*.jsonl`
/// in the first `projects_dir/<key>/` (see [`project_keys`]) that has any,
/// `working` when the last `assistant` line of its last 8 KiB has a `tool_use`
/// content item, else `idle`. Every failure (no directory, no transcript, an
/// unreadable file, no assistant line) is `idle`; lines that are not JSON are
/// skipped.
pub(crate) fn infer(projects_dir: &Path, cwd: &str) -> Status {
    for key in project_keys(cwd) {
        if !is_single_component(&key) {
            continue;
        }
        if let Some(newest) = newest_transcript(&projects_dir.join(key)) {
            return match read_tail(&newest) {
                Ok(tail) => status_of_tail(&tail),
                Err(_) => Status::Idle,
            };
        }
    }
    Status::Idle
}

/// The `*.jsonl` file in `dir` with the latest mtime (ties: the greatest name,
/// so the answer does not depend on directory order).
fn newest_transcript(dir: &Path) -> Option<PathBuf> {
    let mut best: Option<(SystemTime, PathBuf)> = None;
    for entry in fs::read_dir(dir).ok()?.flatten() {
        let path = entry.path();
        if path.extension().is_none_or(|e| e != "jsonl") {
            continue;
        }
        // Follows symlinks: a linked transcript counts like a real one.
        let Ok(meta) = fs::metadata(&path) else {
            continue;
        };
        if !meta.is_file() {
            continue;
        }
        let mtime = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
        let newer = match &best {
            None => true,
            Some((t, p)) => (mtime, &path) > (*t, p),
        };
        if newer {
            best = Some((mtime, path));
        }
    }
    best.map(|(_, p)| p)
}

/// The complete lines among the last [`TAIL_BYTES`] of `path`. One byte before
/// the window is read too, to tell whether the window starts on a line
/// boundary; if not, its partial first line is dropped.
fn read_tail(path: &Path) -> io::Result<Vec<u8>> {
    let mut file = File::open(path)?;
    let len = file.metadata()?.len();
    let start = len.saturating_sub(TAIL_BYTES + 1);
    file.seek(SeekFrom::Start(start))?;
    let mut buf = Vec::with_capacity((len - start) as usize);
    // `take`: a transcript that grows while we read does not make us read more.
    file.take(TAIL_BYTES + 1).read_to_end(&mut buf)?;
    if start == 0 && buf.len() as u64 <= TAIL_BYTES {
        return Ok(buf);
    }
    // buf[0] is the lookbehind byte: everything through the first newline is
    // either that byte alone (window on a boundary) or a partial line.
    match buf.iter().position(|&b| b == b'\n') {
        Some(i) => {
            buf.drain(..=i);
            Ok(buf)
        }
        None => Ok(Vec::new()),
    }
}

/// `working` when the last line of type `assistant` in `tail` has a content item
/// of type `tool_use`.
fn status_of_tail(tail: &[u8]) -> Status {
    let last_assistant = tail
        .split(|&b| b == b'\n')
        .rev()
        .filter_map(|line| serde_json::from_slice::<Value>(line).ok())
        .find(|v| v.get("type").and_then(Value::as_str) == Some("assistant"));
    let uses_tool = last_assistant
        .as_ref()
        .and_then(|v| v.pointer("/message/content"))
        .and_then(Value::as_array)
        .is_some_and(|items| {
            items
                .iter()
                .any(|item| item.get("type").and_then(Value::as_str) == Some("tool_use"))
        });
    if uses_tool {
        Status::Working
    } else {
        Status::Idle
    }
}

/// Called on the reader thread with the inferred status.
pub(crate) type Reply = Box<dyn FnOnce(Status) + Send>;

struct Request {
    cwd: String,
    reply: Reply,
}

/// The `transcripts` thread: answers [`infer`] requests in arrival order so
/// that no shard's event loop waits on the file system. Shared by all shards
/// (it is `Sync`); dropping it (or [`TranscriptReader::shutdown`]) ends the
/// thread once the queued requests are answered.
pub(crate) struct TranscriptReader {
    tx: Sender<Request>,
    join: JoinHandle<()>,
}

impl TranscriptReader {
    pub(crate) fn spawn(projects_dir: PathBuf) -> io::Result<TranscriptReader> {
        let (tx, rx) = crossbeam_channel::bounded::<Request>(QUEUE_CAPACITY);
        let join = std::thread::Builder::new()
            .name("transcripts".into())
            .spawn(move || {
                for Request { cwd, reply } in rx {
                    reply(infer(&projects_dir, &cwd));
                }
            })?;
        Ok(TranscriptReader { tx, join })
    }

    /// Queues an inference for `cwd`; `reply` runs on the reader thread with
    /// the answer. Never blocks: returns false (and drops `reply` uncalled)
    /// when the queue is full or the thread is gone, and the caller simply
    /// keeps the status it has.
    pub(crate) fn request(&self, cwd: String, reply: Reply) -> bool {
        match self.tx.try_send(Request { cwd, reply }) {
            Ok(()) => true,
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => false,
        }
    }

    /// Closes the queue and waits for the thread to answer what is queued and
    /// exit.
    pub(crate) fn shutdown(self) {
        let TranscriptReader { tx, join } = self;
        drop(tx);
        let _ = join.join();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    const TOOL_USE: &str = r#"{"type":"assistant","message":{"role":"assistant","content":[{"type":"text","text":"let me look"},{"type":"tool_use","id":"t1","name":"Bash","input":{}}]}}"#;
    const TEXT_ONLY: &str = r#"{"type":"assistant","message":{"role":"assistant","content":[{"type":"text","text":"done"}]}}"#;
    const USER: &str = r#"{"type":"user","message":{"role":"user","content":[{"type":"tool_result","tool_use_id":"t1","content":"ok"}]}}"#;

    /// Writes `lines` as the transcript `projects/<key>/<name>`, with the
    /// given mtime (seconds since the epoch).
    fn transcript(projects: &Path, key: &str, name: &str, lines: &[&str], mtime: u64) -> PathBuf {
        let dir = projects.join(key);
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join(name);
        let mut text = lines.join("\n");
        text.push('\n');
        fs::write(&path, text).unwrap();
        let f = File::options().write(true).open(&path).unwrap();
        f.set_modified(UNIX_EPOCH + Duration::from_secs(mtime))
            .unwrap();
        path
    }

    const CWD: &str = "/home/me/proj";
    const KEY: &str = "-home-me-proj";

    #[test]
    fn keys_of_a_unix_cwd() {
        assert_eq!(project_keys(CWD), vec![KEY.to_string()]);
        assert_eq!(
            project_keys("home/me:x"),
            vec!["home-me-x", "home-me:x", "-home-me-x"]
        );
    }

    #[test]
    fn keys_of_a_windows_cwd() {
        assert_eq!(
            project_keys(r"C:\Users\me\proj"),
            vec![
                "C--Users-me-proj",
                r"C:\Users\me\proj",
                "-Users-me-proj",
                "-C--Users-me-proj",
            ]
        );
    }

    #[test]
    fn keys_that_leave_the_projects_dir_are_not_tried() {
        let projects = tempfile::tempdir().unwrap();
        let inner = projects.path().join("inner");
        // A transcript in the projects dir itself must not answer for cwd "".
        transcript(projects.path(), "", "a.jsonl", &[TOOL_USE], 10);
        transcript(&inner, "..", "b.jsonl", &[TOOL_USE], 10);
        assert_eq!(infer(projects.path(), ""), Status::Idle);
        assert_eq!(infer(&inner, ".."), Status::Idle);
    }

    #[test]
    fn a_last_assistant_line_with_tool_use_is_working() {
        let projects = tempfile::tempdir().unwrap();
        transcript(
            projects.path(),
            KEY,
            "s.jsonl",
            &[USER, TEXT_ONLY, TOOL_USE],
            10,
        );
        assert_eq!(infer(projects.path(), CWD), Status::Working);
        // Later non-assistant lines do not matter.
        transcript(projects.path(), KEY, "s.jsonl", &[TOOL_USE, USER], 10);
        assert_eq!(infer(projects.path(), CWD), Status::Working);
    }

    #[test]
    fn a_last_assistant_line_without_tool_use_is_idle() {
        let projects = tempfile::tempdir().unwrap();
        transcript(projects.path(), KEY, "s.jsonl", &[USER, TEXT_ONLY], 10);
        assert_eq!(infer(projects.path(), CWD), Status::Idle);
    }

    #[test]
    fn tool_use_only_in_an_earlier_assistant_line_is_idle() {
        let projects = tempfile::tempdir().unwrap();
        transcript(
            projects.path(),
            KEY,
            "s.jsonl",
            &[TOOL_USE, USER, TEXT_ONLY],
            10,
        );
        assert_eq!(infer(projects.path(), CWD), Status::Idle);
    }

    #[test]
    fn no_transcript_is_idle() {
        let projects = tempfile::tempdir().unwrap();
        // No projects dir at all.
        assert_eq!(infer(&projects.path().join("missing"), CWD), Status::Idle);
        // No directory for the cwd.
        assert_eq!(infer(projects.path(), CWD), Status::Idle);
        // A directory with no *.jsonl.
        fs::create_dir_all(projects.path().join(KEY)).unwrap();
        fs::write(projects.path().join(KEY).join("notes.txt"), TOOL_USE).unwrap();
        assert_eq!(infer(projects.path(), CWD), Status::Idle);
        // An empty transcript.
        fs::write(projects.path().join(KEY).join("s.jsonl"), "").unwrap();
        assert_eq!(infer(projects.path(), CWD), Status::Idle);
    }

    #[test]
    fn bad_lines_are_skipped() {
        let projects = tempfile::tempdir().unwrap();
        let garbage = "{\"type\":\"assistant\",\"message\":{\"content\":[{\"typ";
        transcript(
            projects.path(),
            KEY,
            "s.jsonl",
            &[TOOL_USE, "not json", "", "[1,2]", "\"assistant\"", garbage],
            10,
        );
        assert_eq!(infer(projects.path(), CWD), Status::Working);
        // Content that is not an array.
        let string_content = r#"{"type":"assistant","message":{"content":"tool_use"}}"#;
        transcript(
            projects.path(),
            KEY,
            "s.jsonl",
            &[TOOL_USE, string_content],
            10,
        );
        assert_eq!(infer(projects.path(), CWD), Status::Idle);
    }

    #[test]
    fn the_newest_transcript_wins() {
        let projects = tempfile::tempdir().unwrap();
        transcript(projects.path(), KEY, "b-old.jsonl", &[TOOL_USE], 100);
        transcript(projects.path(), KEY, "a-new.jsonl", &[TEXT_ONLY], 200);
        assert_eq!(infer(projects.path(), CWD), Status::Idle);
        transcript(projects.path(), KEY, "b-old.jsonl", &[TOOL_USE], 300);
        assert_eq!(infer(projects.path(), CWD), Status::Working);
    }

    #[test]
    fn the_first_key_with_transcripts_wins() {
        let projects = tempfile::tempdir().unwrap();
        let cwd = "home/me/proj";
        // "home-me-proj" exists but is empty: the "-home-me-proj" variant answers.
        fs::create_dir_all(projects.path().join("home-me-proj")).unwrap();
        transcript(projects.path(), "-home-me-proj", "s.jsonl", &[TOOL_USE], 10);
        assert_eq!(infer(projects.path(), cwd), Status::Working);
        transcript(projects.path(), "home-me-proj", "s.jsonl", &[TEXT_ONLY], 10);
        assert_eq!(infer(projects.path(), cwd), Status::Idle);
    }

    #[test]
    fn only_the_last_8_kib_is_read() {
        let projects = tempfile::tempdir().unwrap();
        let filler = format!(
            r#"{{"type":"user","message":{{"content":"{}"}}}}"#,
            "x".repeat(500)
        );
        let mut lines = vec![TOOL_USE];
        lines.extend(std::iter::repeat_n(filler.as_str(), 60));
        lines.push(TEXT_ONLY);
        let path = transcript(projects.path(), KEY, "s.jsonl", &lines, 10);
        assert!(fs::metadata(&path).unwrap().len() > 3 * TAIL_BYTES);
        assert_eq!(infer(projects.path(), CWD), Status::Idle);

        lines.pop();
        lines.push(TOOL_USE);
        transcript(projects.path(), KEY, "s.jsonl", &lines, 10);
        assert_eq!(infer(projects.path(), CWD), Status::Working);

        // The tool_use line far before the window is not seen.
        lines.pop();
        transcript(projects.path(), KEY, "s.jsonl", &lines, 10);
        assert_eq!(infer(projects.path(), CWD), Status::Idle);
    }

    #[test]
    fn a_line_cut_by_the_window_is_skipped_and_one_on_its_edge_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.jsonl");
        let last = format!("{TOOL_USE}\n");
        // The window starts inside TOOL_USE: it is cut and dropped.
        let mut text = format!("{TOOL_USE}\n{}", "\n".repeat(TAIL_BYTES as usize - 10));
        fs::write(&path, &text).unwrap();
        assert_eq!(status_of_tail(&read_tail(&path).unwrap()), Status::Idle);
        // The window starts exactly on TOOL_USE's first byte: it is kept.
        let pad = TAIL_BYTES as usize - last.len();
        text = format!("{}\n{last}{}", "x".repeat(100), "\n".repeat(pad));
        fs::write(&path, &text).unwrap();
        let tail = read_tail(&path).unwrap();
        assert_eq!(tail.len() as u64, TAIL_BYTES);
        assert_eq!(status_of_tail(&tail), Status::Working);
    }

    #[test]
    fn a_windows_cwd_finds_its_transcript() {
        let projects = tempfile::tempdir().unwrap();
        transcript(
            projects.path(),
            "C--Users-me-proj",
            "s.jsonl",
            &[TOOL_USE],
            10,
        );
        assert_eq!(infer(projects.path(), r"C:\Users\me\proj"), Status::Working);

        // Stripped drive letter.
        let other = tempfile::tempdir().unwrap();
        transcript(other.path(), "-Users-me-proj", "s.jsonl", &[TOOL_USE], 10);
        assert_eq!(infer(other.path(), r"C:\Users\me\proj"), Status::Working);
    }

    #[test]
    fn the_reader_thread_answers_through_the_callback() {
        let projects = tempfile::tempdir().unwrap();
        transcript(projects.path(), KEY, "s.jsonl", &[TOOL_USE], 10);
        let reader = TranscriptReader::spawn(projects.path().to_path_buf()).unwrap();
        let (tx, rx) = crossbeam_channel::unbounded();
        for cwd in [CWD, "/elsewhere"] {
            let tx = tx.clone();
            let name = cwd.to_string();
            assert!(reader.request(
                cwd.to_string(),
                Box::new(move |s| {
                    let thread = std::thread::current().name().map(str::to_string);
                    tx.send((name, s, thread)).unwrap();
                }),
            ));
        }
        let got: Vec<_> = (0..2)
            .map(|_| rx.recv_timeout(Duration::from_secs(10)).unwrap())
            .collect();
        let thread = Some("transcripts".to_string());
        assert_eq!(
            got,
            vec![
                (CWD.to_string(), Status::Working, thread.clone()),
                ("/elsewhere".to_string(), Status::Idle, thread),
            ]
        );
        reader.shutdown();
    }

    #[test]
    fn shutdown_answers_what_is_queued_then_ends_the_thread() {
        let projects = tempfile::tempdir().unwrap();
        let reader = TranscriptReader::spawn(projects.path().join("missing")).unwrap();
        let (tx, rx) = crossbeam_channel::unbounded();
        for i in 0..100 {
            let tx = tx.clone();
            assert!(reader.request(format!("/p/{i}"), Box::new(move |s| tx.send(s).unwrap())));
        }
        drop(tx);
        reader.shutdown();
        assert_eq!(rx.iter().count(), 100);
    }

    #[test]
    fn a_full_queue_refuses_without_blocking() {
        let projects = tempfile::tempdir().unwrap();
        let reader = TranscriptReader::spawn(projects.path().to_path_buf()).unwrap();
        // Hold the thread inside the first callback until the queue is full.
        let (gate_tx, gate_rx) = crossbeam_channel::bounded::<()>(0);
        let (started_tx, started_rx) = crossbeam_channel::bounded::<()>(1);
        assert!(reader.request(
            CWD.into(),
            Box::new(move |_| {
                started_tx.send(()).unwrap();
                let _ = gate_rx.recv();
            }),
        ));
        started_rx.recv_timeout(Duration::from_secs(10)).unwrap();
        for _ in 0..QUEUE_CAPACITY {
            assert!(reader.request(CWD.into(), Box::new(|_| {})));
        }
        assert!(!reader.request(CWD.into(), Box::new(|_| {})));
        drop(gate_tx);
        reader.shutdown();
    }
}
