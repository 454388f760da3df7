//! Subjects and the bus messages' encoding.
//!
//! Subjects: `meshbroker.nodes.beat` (heartbeats), `meshbroker.node.<id>.ok`
//! (confirms, to the node that asked), and per mesh `meshbroker.<mesh>.dir`
//! (a node's sessions of the mesh, whole), `.sync` (a node that just
//! subscribed asks for everyone's part), `.route` (a send), `.held` (a
//! held envelope handed to the node that now has its member), `.event`
//! (peer events, as their frames) and `.groups` (members' group changes).
//!
//! A send crosses as one JSON head line (routing facts, made with serde)
//! then the push frame as encoded on the sender's node, byte for byte: the
//! receiving node queues that very frame, so the push is serialized once
//! in the whole cluster.
use crate::mesh::plan::{key, Targets};
use crate::mesh::Envelope;
use crate::status::hook_index::HookRank;
use bytes::{BufMut, Bytes, BytesMut};
use serde::{Deserialize, Serialize};
use std::borrow::Cow;
use std::fmt::Write as _;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub const BEAT: &str = "meshbroker.nodes.beat";
/// Hook signals no session of the receiving node matched.
pub const HOOKS: &str = "meshbroker.nodes.hook";

/// A mesh id as one subject token: itself when it is plain, else hex.
pub fn mesh_token(mesh_id: &str) -> String {
    let plain = !mesh_id.is_empty()
        && mesh_id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if plain {
        mesh_id.to_owned()
    } else {
        let hex: String = mesh_id.bytes().map(|b| format!("{b:02x}")).collect();
        format!("x{hex}")
    }
}

pub fn mesh_subject(mesh_id: &str, kind: &str) -> String {
    format!("meshbroker.{}.{kind}", mesh_token(mesh_id))
}

pub fn mesh_wildcard(mesh_id: &str) -> String {
    format!("meshbroker.{}.*", mesh_token(mesh_id))
}

pub fn confirm_subject(node: &str) -> String {
    format!("meshbroker.node.{node}.ok")
}

/// Whom a crossing send is for.
#[derive(Serialize, Deserialize, Debug, PartialEq, Eq, Clone, Copy)]
pub enum Kind {
    /// `target`, one member.
    Member,
    /// Every member of the mesh but the sender's and `keys`.
    AllBut,
    /// The members in `keys`.
    Listed,
    /// `target`, one session's key (PROTOCOL.md §9): that session alone.
    Session,
}

/// The routing facts of a send or handed-over held envelope. Borrowed from
/// the envelope when sent and from the payload when received (ids and keys
/// have nothing to escape), so a crossing allocates no strings.
#[derive(Serialize, Deserialize, Debug, PartialEq, Eq)]
pub struct Head<'a> {
    /// The node that sent it, and the confirm it waits for (0: none).
    #[serde(borrow)]
    pub from: Cow<'a, str>,
    pub seq: u64,
    /// The nodes that should take it.
    #[serde(borrow)]
    pub to: Vec<Cow<'a, str>>,
    #[serde(borrow)]
    pub mesh: Cow<'a, str>,
    #[serde(borrow)]
    pub id: Cow<'a, str>,
    /// The sender's member key.
    #[serde(borrow)]
    pub sender: Cow<'a, str>,
    pub kind: Kind,
    /// `Member`: its key.
    #[serde(borrow)]
    pub target: Option<Cow<'a, str>>,
    /// The send's `targetSpec` as stored (a broadcast's `*`, `@group`).
    #[serde(borrow)]
    pub spec: Cow<'a, str>,
    /// Member keys (see `Kind`).
    #[serde(borrow)]
    pub keys: Vec<Cow<'a, str>>,
    #[serde(borrow)]
    pub priority: Cow<'a, str>,
    pub created_ms: u64,
    pub expires_ms: u64,
    #[serde(borrow)]
    pub client_message_id: Option<Cow<'a, str>>,
    /// Nonce and ciphertext ranges in the frame.
    pub nonce: [u32; 2],
    pub ciphertext: [u32; 2],
    /// A handed-over envelope whose lease lapsed: its next push says
    /// `redelivered` (PROTOCOL.md §11).
    #[serde(default)]
    pub redelivered: bool,
}

fn millis(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

pub fn from_millis(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
}

impl<'a> Head<'a> {
    /// The facts of `envelope` for `targets`; member keys looked up in the
    /// envelope's mesh (only for a broadcast that skips someone, or a group).
    pub fn new(
        envelope: &'a Envelope,
        targets: &Targets,
        from: &'a str,
        seq: u64,
        to: Vec<Cow<'a, str>>,
    ) -> Head<'a> {
        let keys_of = |wanted: &[usize]| -> Vec<Cow<'a, str>> {
            if wanted.is_empty() {
                return Vec::new();
            }
            let view = envelope.mesh.view();
            view.members()
                .iter()
                .filter(|m| wanted.binary_search(&key(m)).is_ok())
                .map(|m| Cow::Owned(m.pubkey.to_string()))
                .collect()
        };
        let (kind, target, keys) = match targets {
            Targets::Member(member) => (
                Kind::Member,
                Some(Cow::Owned(member.pubkey.to_string())),
                Vec::new(),
            ),
            Targets::Session(entry) => (
                Kind::Member,
                Some(Cow::Owned(entry.member.pubkey.to_string())),
                Vec::new(),
            ),
            Targets::RemoteSession { key, .. } => {
                (Kind::Session, Some(Cow::Owned(key.to_string())), Vec::new())
            }
            Targets::AllBut { held_for } => (Kind::AllBut, None, keys_of(held_for)),
            Targets::Listed { members } => (Kind::Listed, None, keys_of(members)),
        };
        Head {
            from: Cow::Borrowed(from),
            seq,
            to,
            mesh: Cow::Borrowed(&envelope.mesh.id),
            id: Cow::Borrowed(&envelope.message_id),
            sender: Cow::Borrowed(&envelope.sender.pubkey),
            kind,
            target,
            spec: Cow::Borrowed(envelope.target.spec()),
            keys,
            priority: Cow::Borrowed(envelope.priority.as_str()),
            created_ms: millis(envelope.created_at),
            expires_ms: millis(envelope.expires_at),
            client_message_id: envelope.client_message_id.as_deref().map(Cow::Borrowed),
            nonce: [envelope.nonce.start, envelope.nonce.end],
            ciphertext: [envelope.ciphertext.start, envelope.ciphertext.end],
            redelivered: false,
        }
    }
}

/// Appends one record to a batch: its length (u32, big-endian), the head
/// line, a newline and the frame. What one bus wakeup routes to one mesh
/// goes out as one message of such records.
pub fn append(batch: &mut BytesMut, head: &Head<'_>, frame: &[u8]) {
    let json = serde_json::to_vec(head).expect("a head serializes");
    append_record(batch, &json, frame);
}

/// Appends a record of a first line (without its newline) and a frame.
/// A peer event's first line is the key of the member it is about.
pub fn append_record(batch: &mut BytesMut, line: &[u8], frame: &[u8]) {
    batch.reserve(4 + line.len() + 1 + frame.len());
    batch.put_u32((line.len() + 1 + frame.len()) as u32);
    batch.put_slice(line);
    batch.put_u8(b'\n');
    batch.put_slice(frame);
}

/// A record's first line and the frame after it (a slice, not a copy).
pub fn split_record(record: &Bytes) -> Option<(&[u8], Bytes)> {
    let newline = record.iter().position(|&b| b == b'\n')?;
    Some((&record[..newline], record.slice(newline + 1..)))
}

/// The records of a batch (slices of `payload`, not copies); `None` for
/// the first that is cut short.
pub fn records(payload: &Bytes) -> impl Iterator<Item = Option<Bytes>> + '_ {
    let mut at = 0;
    std::iter::from_fn(move || {
        if at >= payload.len() {
            return None;
        }
        let len = payload
            .get(at..at + 4)
            .map(|b| u32::from_be_bytes(b.try_into().expect("4 bytes")) as usize);
        match len {
            Some(len) if at + 4 + len <= payload.len() => {
                let record = payload.slice(at + 4..at + 4 + len);
                at += 4 + len;
                Some(Some(record))
            }
            _ => {
                at = payload.len();
                Some(None)
            }
        }
    })
}

/// Each record's first line and the frame after it (slices of `payload`,
/// not copies), up to the first cut short.
pub fn lines(payload: &Bytes) -> impl Iterator<Item = (Bytes, Bytes)> + '_ {
    records(payload).map_while(|record| {
        let record = record?;
        let (line, frame) = split_record(&record)?;
        Some((record.slice(..line.len()), frame))
    })
}

/// A record's head and frame (a slice of it, not a copy).
pub fn decode(record: &Bytes) -> Option<(Head<'_>, Bytes)> {
    let (line, frame) = split_record(record)?;
    let head: Head<'_> = serde_json::from_slice(line).ok()?;
    let in_frame = |r: [u32; 2]| r[0] <= r[1] && r[1] as usize <= frame.len();
    (in_frame(head.nonce) && in_frame(head.ciphertext)).then_some((head, frame))
}

/// A confirm line, `<seq> <node> ok|no[ <presence id>[ <rank>]]\n`,
/// appended to `out`: the confirms one node owes another are sent
/// together, one line each, as many as arrived in one turn of the bus
/// loop. A hook's candidate carries its rank, `p<ms>` (a pid match) or
/// `c<ms>` (the newest of the cwd), `ms` its hello time.
pub fn confirm(out: &mut Vec<u8>, confirm: &Confirm<'_>) {
    use std::io::Write;
    let verdict = if confirm.taken { "ok" } else { "no" };
    let _ = write!(out, "{} {} {verdict}", confirm.seq, confirm.node);
    if let Some(presence) = confirm.presence {
        let _ = write!(out, " {presence}");
        if let Some(rank) = confirm.rank {
            let kind = if rank.pid_match { 'p' } else { 'c' };
            let _ = write!(out, " {kind}{}", rank.since_ms);
        }
    }
    out.push(b'\n');
}

/// A confirm: its sequence, node and verdict, and for a hook the session
/// it found and (asked for a candidate) how well it matches.
#[derive(Debug, PartialEq, Eq, Clone, Copy)]
pub struct Confirm<'a> {
    pub seq: u64,
    pub node: &'a str,
    pub taken: bool,
    pub presence: Option<&'a str>,
    pub rank: Option<HookRank>,
}

impl<'a> Confirm<'a> {
    pub fn plain(seq: u64, node: &'a str, taken: bool) -> Self {
        Confirm {
            seq,
            node,
            taken,
            presence: None,
            rank: None,
        }
    }
}

/// The confirms of one message, each line parsed (bad lines skipped).
pub fn parse_confirms(payload: &[u8]) -> impl Iterator<Item = Confirm<'_>> {
    payload
        .split(|&b| b == b'\n')
        .filter(|line| !line.is_empty())
        .filter_map(parse_confirm)
}

fn parse_confirm(line: &[u8]) -> Option<Confirm<'_>> {
    let text = std::str::from_utf8(line).ok()?;
    let mut parts = text.split(' ');
    let seq = parts.next()?.parse().ok()?;
    let node = parts.next()?;
    let taken = match parts.next()? {
        "ok" => true,
        "no" => false,
        _ => return None,
    };
    let presence = parts.next();
    let rank = match parts.next() {
        None => None,
        Some(rank) => {
            let pid_match = match rank.as_bytes().first()? {
                b'p' => true,
                b'c' => false,
                _ => return None,
            };
            let since_ms = rank[1..].parse().ok()?;
            Some(HookRank {
                pid_match,
                since_ms,
            })
        }
    };
    Some(Confirm {
        seq,
        node,
        taken,
        presence,
        rank,
    })
}

/// A member's group change, as one record's line (no frame) on the mesh's
/// `.groups` subject.
#[derive(Serialize, Deserialize, Debug, PartialEq, Eq, Clone)]
pub struct GroupChange {
    /// Set by the bus: the member's key.
    #[serde(default)]
    pub member: String,
    pub name: String,
    pub role: Option<String>,
    pub joined: bool,
}

/// A forwarded hook signal. `seq` 0 is a stash (no answer wanted); else,
/// without `apply`, a question (each node answers with its best match,
/// applying nothing), with it, the signal for that presence alone.
#[derive(Serialize, Deserialize, Debug, PartialEq, Eq)]
pub struct HookHead {
    pub from: String,
    pub seq: u64,
    pub pid: Option<i32>,
    pub cwd: String,
    pub status: String,
    #[serde(default)]
    pub apply: Option<String>,
}

/// One session in a node's part: its member, whether it is live (not
/// away) and whether it takes `next` now, its own key (a `session_hello`
/// session's), its presence, its `sessionId` (hashed: a hello may take it
/// over from another node), and its `peers_list` entry.
#[derive(Debug, PartialEq, Eq)]
pub struct PartSession<'a> {
    pub member: &'a str,
    pub live: bool,
    pub open: bool,
    pub session_key: Option<&'a str>,
    pub presence: &'a str,
    pub session_hash: u64,
    pub entry: &'a [u8],
    /// A dead node's session this node lists away, for this many more
    /// milliseconds of its grace (0: one of this node's own).
    pub stranded_ms: u64,
}

impl PartSession<'_> {
    /// Its session key as this node's indexes hold keys (lowercase).
    pub fn lowercase_key(&self) -> Option<Box<str>> {
        self.session_key.map(|k| k.to_ascii_lowercase().into())
    }
}

pub use crate::mesh::identity::session_hash;

/// A node's sessions of a mesh, in one or more chunks (NATS messages),
/// each at most `max_bytes` unless one session alone is larger: a header
/// line `<node>\t<generation>\t<chunk>\t<chunks>` then one line per
/// session, `<member key>\t<l|-><o|->[x<stranded ms>]\t<session key|->
/// \t<presence>\t<hash hex>\t<entry json>`. Entries are JSON written by
/// `protocol` (no raw newline or tab); keys are hex, presence ids base32.
/// A receiver applies a generation once it has all its chunks.
pub fn encode_part(
    node: &str,
    generation: u64,
    sessions: &[PartSession<'_>],
    max_bytes: usize,
) -> Vec<Bytes> {
    let header = 64 + node.len();
    let mut bodies = Vec::new();
    let mut body = BytesMut::new();
    for session in sessions {
        let start = body.len();
        put_part_line(&mut body, session);
        if start != 0 && body.len() + header > max_bytes {
            let line = body.split_off(start);
            bodies.push(std::mem::replace(&mut body, line));
        }
    }
    bodies.push(body);
    let count = bodies.len();
    bodies
        .into_iter()
        .enumerate()
        .map(|(index, body)| {
            let mut chunk = BytesMut::with_capacity(body.len() + header);
            let _ = writeln!(chunk, "{node}\t{generation}\t{index}\t{count}");
            chunk.put_slice(&body);
            chunk.freeze()
        })
        .collect()
}

fn put_part_line(out: &mut BytesMut, session: &PartSession<'_>) {
    out.put_slice(session.member.as_bytes());
    out.put_u8(b'\t');
    out.put_u8(if session.live { b'l' } else { b'-' });
    out.put_u8(if session.open { b'o' } else { b'-' });
    if session.stranded_ms != 0 {
        let _ = write!(out, "x{}", session.stranded_ms);
    }
    out.put_u8(b'\t');
    out.put_slice(session.session_key.unwrap_or("-").as_bytes());
    out.put_u8(b'\t');
    out.put_slice(session.presence.as_bytes());
    let _ = write!(out, "\t{:x}\t", session.session_hash);
    out.put_slice(session.entry);
    out.put_u8(b'\n');
}

/// Which chunk of which publication of a node's part a message is.
#[derive(Debug, PartialEq, Eq, Clone, Copy)]
pub struct PartHead<'a> {
    pub node: &'a str,
    pub generation: u64,
    pub chunk: u32,
    pub chunks: u32,
}

pub fn decode_part(payload: &[u8]) -> Option<(PartHead<'_>, Vec<PartSession<'_>>)> {
    let mut lines = payload.split(|&b| b == b'\n');
    let head = std::str::from_utf8(lines.next()?).ok()?;
    let mut fields = head.split('\t');
    let head = PartHead {
        node: fields.next()?,
        generation: fields.next()?.parse().ok()?,
        chunk: fields.next()?.parse().ok()?,
        chunks: fields.next()?.parse().ok()?,
    };
    if head.chunk >= head.chunks || fields.next().is_some() {
        return None;
    }
    let mut sessions = Vec::new();
    for line in lines.filter(|l| !l.is_empty()) {
        let mut fields = line.splitn(6, |&b| b == b'\t');
        let mut text = || std::str::from_utf8(fields.next()?).ok();
        let (member, flags, session_key, presence, hash) =
            (text()?, text()?, text()?, text()?, text()?);
        let entry = fields.next()?;
        let stranded_ms = match flags.get(2..) {
            Some("") => 0,
            Some(rest) => rest.strip_prefix('x')?.parse().ok()?,
            None => return None,
        };
        if flags.len() < 2
            || session_key.is_empty()
            || presence.is_empty()
            || !entry.starts_with(b"{")
        {
            return None;
        }
        let flags = flags.as_bytes();
        sessions.push(PartSession {
            member,
            live: flags[0] == b'l',
            open: flags[1] == b'o',
            session_key: (session_key != "-").then_some(session_key),
            presence,
            session_hash: u64::from_str_radix(hash, 16).ok()?,
            entry,
            stranded_ms,
        });
    }
    Some((head, sessions))
}

/// The chunks of one node's part gathered until they are all here. NATS
/// keeps one publisher's messages in order, so a chunk of another
/// publication (a newer one, or the node restarted) replaces one still
/// incomplete.
#[derive(Default)]
pub struct PartChunks {
    generation: u64,
    chunks: Vec<Option<Bytes>>,
}

impl PartChunks {
    /// Adds a chunk (`payload`, whose header is `head`); all of its
    /// publication's chunks, in order, once complete.
    pub fn add(&mut self, head: PartHead<'_>, payload: Bytes) -> Option<Vec<Bytes>> {
        if head.generation != self.generation || self.chunks.len() != head.chunks as usize {
            self.generation = head.generation;
            self.chunks = vec![None; head.chunks as usize];
        }
        self.chunks[head.chunk as usize] = Some(payload);
        if self.chunks.iter().any(Option::is_none) {
            return None;
        }
        let done = std::mem::take(&mut self.chunks);
        Some(done.into_iter().flatten().collect())
    }
}

/// An admin's kick, ban or unban of `member` (its id) on one node, for
/// every other node's sessions and directory (PROTOCOL.md §13).
#[derive(Serialize, Deserialize, Debug, PartialEq, Eq, Clone, Copy)]
#[serde(rename_all = "lowercase")]
pub enum AdminAction {
    Kick,
    Ban,
    Unban,
}

#[derive(Serialize, Deserialize, Debug, PartialEq, Eq)]
pub struct AdminChange {
    pub member: String,
    pub action: AdminAction,
}

/// A hello on node `from` asks node `to` for its session `presence` of
/// `member` (PROTOCOL.md §9 resume, across nodes); the answer is a
/// `peers::MovedSession` (JSON), or `null`.
#[derive(Serialize, Deserialize, Debug, PartialEq, Eq)]
pub struct Take {
    pub from: String,
    pub to: String,
    pub member: String,
    pub presence: String,
    /// What the hello says, checked by the node that has the session
    /// (parts carry only a hash of the `sessionId`).
    pub session_id: String,
    pub session_key: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mesh_ids_become_single_tokens() {
        assert_eq!(mesh_token("mesh-1_a"), "mesh-1_a");
        assert_eq!(mesh_token("a.b"), "x612e62");
        assert_eq!(mesh_token("a b>*"), "x6120623e2a");
        assert_eq!(mesh_subject("m", "dir"), "meshbroker.m.dir");
    }

    #[test]
    fn confirms_round_trip_and_refuse_garbage() {
        let mut out = Vec::new();
        let candidate = Confirm {
            presence: Some("p2"),
            rank: Some(HookRank {
                pid_match: true,
                since_ms: 42,
            }),
            ..Confirm::plain(4, "c", true)
        };
        let sent = vec![
            Confirm::plain(7, "b-1", true),
            Confirm::plain(9, "c", false),
            Confirm {
                presence: Some("p1"),
                ..Confirm::plain(3, "c", true)
            },
            candidate,
        ];
        for c in &sent[..2] {
            confirm(&mut out, c);
        }
        out.extend_from_slice(b"7 b maybe\nx b ok\n\n5 c ok p1 z9\n");
        for c in &sent[2..] {
            confirm(&mut out, c);
        }
        let got: Vec<_> = parse_confirms(&out).collect();
        assert_eq!(got, sent);
        assert_eq!(parse_confirms(b"").count(), 0);
    }

    #[test]
    fn a_large_part_goes_in_chunks_applied_once_all_are_here() {
        let keys: Vec<String> = (0..50).map(|i| format!("{i:064x}")).collect();
        let entry = [b'{'; 200];
        let sessions: Vec<PartSession<'_>> = keys
            .iter()
            .map(|k| PartSession {
                member: k,
                live: true,
                open: false,
                session_key: None,
                presence: "p",
                session_hash: 1,
                entry: &entry,
                stranded_ms: 0,
            })
            .collect();
        let chunks = encode_part("n1", 3, &sessions, 2000);
        assert!(chunks.len() > 5 && chunks.iter().all(|c| c.len() <= 2000));
        let mut gathered = PartChunks::default();
        // A whole publication, then this one's chunks, a later chunk first.
        let old = encode_part("n1", 2, &sessions[..1], 2000);
        assert!(gathered
            .add(decode_part(&old[0]).unwrap().0, old[0].clone())
            .is_some());
        let mut done = None;
        let (first, rest) = chunks.split_first().unwrap();
        for chunk in rest.iter().chain([first]) {
            assert!(done.is_none(), "complete before the last chunk");
            done = gathered.add(decode_part(chunk).unwrap().0, chunk.clone());
        }
        let done = done.expect("complete");
        let all: Vec<PartSession<'_>> = done
            .iter()
            .flat_map(|c| decode_part(c).unwrap().1)
            .collect();
        assert_eq!(all, sessions);
    }

    #[test]
    fn parts_round_trip() {
        let session = |member, live, session_key, entry| PartSession {
            member,
            live,
            open: live,
            stranded_ms: if live { 0 } else { 29_000 },
            session_key,
            presence: "p1",
            session_hash: session_hash("s\t1"),
            entry,
        };
        let sessions = vec![
            session("aa", true, None, br#"{"pubkey":"aa"}"#.as_slice()),
            session("bb", false, Some("cc"), br#"{"pubkey":"bb","x":"\t"}"#),
        ];
        let chunks = encode_part("n1", 7, &sessions, 1 << 20);
        assert_eq!(chunks.len(), 1);
        let (head, got) = decode_part(&chunks[0]).unwrap();
        let whole = PartHead {
            node: "n1",
            generation: 7,
            chunk: 0,
            chunks: 1,
        };
        assert_eq!(head, whole);
        assert_eq!(got, sessions);
        assert!(decode_part(b"n\t1\t0\t1\naa\tlo\t-\tp\t1f\tnot json\n").is_none());
        assert!(decode_part(b"n\t1\t0\t1\naa\tlo\t-\tp\tnot hex\t{}\n").is_none());
        assert!(decode_part(b"n\t1\t0\t1\naa\tlo\t{}\n").is_none());
        assert!(
            decode_part(b"n\t1\t1\t1\n").is_none(),
            "chunk past the count"
        );
        assert!(decode_part(b"n\n").is_none(), "no header");
        assert_ne!(session_hash("a"), session_hash("b"));
        assert_eq!(decode_part(b"n\t1\t0\t1\n").unwrap().1, vec![]);
        assert_eq!(
            encode_part("n1", 8, &[], 100).len(),
            1,
            "an empty part is one chunk"
        );
    }

    #[test]
    fn a_head_with_ranges_outside_its_frame_is_refused() {
        let head = Head {
            from: "a".into(),
            seq: 1,
            to: vec!["b".into()],
            mesh: "m".into(),
            id: "i".into(),
            sender: "s".into(),
            kind: Kind::Member,
            target: Some("t".into()),
            spec: "t".into(),
            keys: vec![],
            priority: "now".into(),
            created_ms: 1,
            expires_ms: 2,
            client_message_id: None,
            nonce: [0, 2],
            ciphertext: [2, 4],
            redelivered: false,
        };
        let mut batch = BytesMut::new();
        append(&mut batch, &head, b"abcd");
        append(&mut batch, &head, b"abc");
        let batch = batch.freeze();
        let records: Vec<Bytes> = records(&batch).map(Option::unwrap).collect();
        assert_eq!(records.len(), 2);
        let (back, frame) = decode(&records[0]).unwrap();
        assert_eq!(back, head);
        assert_eq!(&frame[..], b"abcd");
        assert!(decode(&records[1]).is_none(), "ranges past the frame");
        assert!(decode(&Bytes::from_static(b"{not json}\nabcd")).is_none());
        assert!(decode(&Bytes::from_static(b"no newline")).is_none());
        // A batch cut short yields its whole records, then one `None`.
        let cut = batch.slice(..batch.len() - 1);
        let got: Vec<Option<Bytes>> = super::records(&cut).collect();
        assert_eq!(got.len(), 2);
        assert!(got[0].is_some() && got[1].is_none());
    }

    #[test]
    fn lines_stop_at_a_record_cut_short_or_without_a_line() {
        let mut batch = BytesMut::new();
        append_record(&mut batch, b"aa", b"frame");
        append_record(&mut batch, b"bb", b"");
        let whole = batch.clone().freeze();
        let got: Vec<(Bytes, Bytes)> = lines(&whole).collect();
        assert_eq!(got.len(), 2);
        assert_eq!((&got[0].0[..], &got[0].1[..]), (&b"aa"[..], &b"frame"[..]));
        assert_eq!((&got[1].0[..], &got[1].1[..]), (&b"bb"[..], &b""[..]));
        assert_eq!(lines(&whole.slice(..whole.len() - 1)).count(), 1);
        batch.clear();
        batch.put_u32(2);
        batch.put_slice(b"xy");
        append_record(&mut batch, b"cc", b"");
        assert_eq!(lines(&batch.freeze()).count(), 0, "no newline: stop");
    }
}
