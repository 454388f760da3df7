//! The part of the NATS core client protocol natsref speaks: the frames a
//! server sends (INFO, MSG, PING, PONG, +OK, -ERR), parsed in place from the
//! read buffer once they have arrived whole, and the few a client sends.
use thiserror::Error;

/// Longest control line accepted; INFO is the long one (a server lists its
/// cluster's URLs there).
const MAX_LINE: usize = 64 * 1024;

/// Largest MSG payload accepted (nats-server's max_payload tops out at 64 MiB).
const MAX_PAYLOAD: usize = 64 * 1024 * 1024;

/// One frame from the server.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Frame<'a> {
    Info,
    Msg { sid: &'a [u8], payload: &'a [u8] },
    Ping,
    Pong,
    Ok,
    Err(String),
}

#[derive(Debug, Error, PartialEq, Eq)]
pub(crate) enum ProtoError {
    #[error("unknown server operation {0:?}")]
    UnknownOp(String),
    #[error("malformed MSG line {0:?}")]
    BadMsg(String),
    #[error("control line longer than {MAX_LINE} bytes")]
    LineTooLong,
    #[error("MSG payload not followed by CRLF")]
    MissingCrlf,
}

/// The frame at the start of `buf` and the bytes it spans, or `None` until
/// all of it (for MSG: the payload and its CRLF too) is there.
pub(crate) fn parse_frame(buf: &[u8]) -> Result<Option<(Frame<'_>, usize)>, ProtoError> {
    let Some(nl) = memchr::memchr(b'\n', buf) else {
        return if buf.len() > MAX_LINE {
            Err(ProtoError::LineTooLong)
        } else {
            Ok(None)
        };
    };
    let line = buf[..nl].strip_suffix(b"\r").unwrap_or(&buf[..nl]);
    let after_line = nl + 1;
    let (op, args) = match line.iter().position(|b| b.is_ascii_whitespace()) {
        Some(i) => (&line[..i], &line[i + 1..]),
        None => (line, &[][..]),
    };
    let frame = if op.eq_ignore_ascii_case(b"MSG") {
        return parse_msg(buf, args, after_line);
    } else if op.eq_ignore_ascii_case(b"PING") {
        Frame::Ping
    } else if op.eq_ignore_ascii_case(b"PONG") {
        Frame::Pong
    } else if op.eq_ignore_ascii_case(b"INFO") {
        Frame::Info
    } else if op.eq_ignore_ascii_case(b"+OK") {
        Frame::Ok
    } else if op.eq_ignore_ascii_case(b"-ERR") {
        let text = String::from_utf8_lossy(args);
        Frame::Err(text.trim().trim_matches('\'').to_string())
    } else {
        return Err(ProtoError::UnknownOp(lossy(line)));
    };
    Ok(Some((frame, after_line)))
}

/// `MSG <subject> <sid> [reply-to] <#bytes>`, then the payload and CRLF.
fn parse_msg<'a>(
    buf: &'a [u8],
    args: &'a [u8],
    after_line: usize,
) -> Result<Option<(Frame<'a>, usize)>, ProtoError> {
    let bad = || ProtoError::BadMsg(lossy(args));
    let mut fields = args
        .split(|b| b.is_ascii_whitespace())
        .filter(|f| !f.is_empty());
    let (Some(_subject), Some(sid)) = (fields.next(), fields.next()) else {
        return Err(bad());
    };
    let rest: Vec<&[u8]> = fields.collect();
    let size = match rest[..] {
        [size] | [_, size] => std::str::from_utf8(size)
            .ok()
            .and_then(|s| s.parse::<usize>().ok())
            .filter(|&n| n <= MAX_PAYLOAD)
            .ok_or_else(bad)?,
        _ => return Err(bad()),
    };
    let end = after_line + size;
    if buf.len() < end + 2 {
        return Ok(None);
    }
    if &buf[end..end + 2] != b"\r\n" {
        return Err(ProtoError::MissingCrlf);
    }
    let payload = &buf[after_line..end];
    Ok(Some((Frame::Msg { sid, payload }, end + 2)))
}

fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(&b[..b.len().min(200)]).into_owned()
}

/// CONNECT: quiet (no +OK), and `echo:false` so a publisher does not get
/// its own messages back, as a broker broadcast skips its sender.
pub(crate) fn connect(name: &str) -> String {
    format!(
        "CONNECT {{\"verbose\":false,\"pedantic\":false,\"echo\":false,\"name\":\"{name}\",\"lang\":\"rust\",\"version\":\"{}\",\"protocol\":1,\"headers\":false}}\r\n",
        env!("CARGO_PKG_VERSION")
    )
}

pub(crate) fn sub(subject: &str, sid: &str) -> String {
    format!("SUB {subject} {sid}\r\n")
}

/// The line before a PUB's payload; the payload then ends with CRLF.
pub(crate) fn pub_line(subject: &str, len: usize) -> String {
    format!("PUB {subject} {len}\r\n")
}

pub(crate) const PING: &[u8] = b"PING\r\n";
pub(crate) const PONG: &[u8] = b"PONG\r\n";

#[cfg(test)]
mod tests {
    use super::*;

    /// Every frame in `buf`, as the client loop takes them.
    fn all(mut buf: &[u8]) -> (Vec<Frame<'_>>, usize) {
        let mut frames = Vec::new();
        let mut used = 0;
        while let Some((f, n)) = parse_frame(buf).unwrap() {
            frames.push(f);
            buf = &buf[n..];
            used += n;
        }
        (frames, used)
    }

    #[test]
    fn several_frames_in_one_read() {
        let buf = b"INFO {\"server_id\":\"x\",\"max_payload\":1048576} \r\nMSG a.b 1 5\r\nhello\r\nPING\r\nPONG\r\n+OK\r\nMSG a.b 7 reply.to 0\r\n\r\n-ERR 'Unknown Subject'\r\n";
        let (frames, used) = all(buf);
        assert_eq!(used, buf.len());
        assert_eq!(
            frames,
            vec![
                Frame::Info,
                Frame::Msg {
                    sid: b"1",
                    payload: b"hello"
                },
                Frame::Ping,
                Frame::Pong,
                Frame::Ok,
                Frame::Msg {
                    sid: b"7",
                    payload: b""
                },
                Frame::Err("Unknown Subject".into()),
            ]
        );
    }

    /// A MSG cut anywhere (inside the line, the payload or its CRLF) waits
    /// for the rest; the payload may hold CR and LF.
    #[test]
    fn msg_split_across_reads() {
        let msg = b"MSG s 1 6\r\na\r\nb\nc\r\nPONG\r\n";
        for cut in 0..msg.len() {
            let (frames, used) = all(&msg[..cut]);
            let rest = &msg[used..];
            assert!(frames.len() <= 1, "cut {cut}");
            let (more, used2) = all(rest);
            assert_eq!(used2, rest.len(), "cut {cut}");
            let got: Vec<_> = frames.into_iter().chain(more).collect();
            assert_eq!(
                got,
                vec![
                    Frame::Msg {
                        sid: b"1",
                        payload: b"a\r\nb\nc"
                    },
                    Frame::Pong
                ],
                "cut {cut}"
            );
        }
    }

    #[test]
    fn bad_frames_are_errors() {
        assert_eq!(
            parse_frame(b"HELLO\r\n"),
            Err(ProtoError::UnknownOp("HELLO".into()))
        );
        assert!(matches!(
            parse_frame(b"MSG s 1 x\r\n"),
            Err(ProtoError::BadMsg(_))
        ));
        assert!(matches!(
            parse_frame(b"MSG s\r\n"),
            Err(ProtoError::BadMsg(_))
        ));
        assert!(matches!(
            parse_frame(b"MSG s 1 a b 3\r\n"),
            Err(ProtoError::BadMsg(_))
        ));
        assert_eq!(
            parse_frame(b"MSG s 1 2\r\nabcd"),
            Err(ProtoError::MissingCrlf)
        );
        assert_eq!(
            parse_frame(&vec![b'x'; MAX_LINE + 1]),
            Err(ProtoError::LineTooLong)
        );
        // Lowercase operations and a bare LF are accepted.
        assert_eq!(parse_frame(b"pong\n"), Ok(Some((Frame::Pong, 5))));
    }

    #[test]
    fn client_lines() {
        let c = connect("natsref-0");
        assert!(c.starts_with("CONNECT {") && c.ends_with("}\r\n"));
        let json: serde_json::Value =
            serde_json::from_str(&c["CONNECT ".len()..c.len() - 2]).unwrap();
        assert_eq!(json["echo"], false);
        assert_eq!(json["verbose"], false);
        assert_eq!(sub("a.b", "1"), "SUB a.b 1\r\n");
        assert_eq!(pub_line("a.b", 256), "PUB a.b 256\r\n");
    }
}
