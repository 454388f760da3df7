//! HTTP/1.1 on the shared port, without I/O.
//!
//! - [`request`]: [`parse_head`] turns the bytes read so far into a [`RequestHead`]
//!   (method, path, framing, keep-alive and WebSocket-upgrade facts) or says
//!   "need more bytes"; it never allocates for an incomplete head.
//! - [`response`]: [`Response`] and its serialization, the CORS preflight answer and
//!   the `{"ok":false,"error":…}` error body used by every refusal (with a
//!   `message` beside a stable `error` code for `/join`).
//!
//! The shard owns the socket: it reads into its buffer, calls [`parse_head`], reads
//! the body (`content_length` bytes) itself, routes, and writes
//! [`Response::to_bytes`].

pub mod request;
pub mod response;

pub use request::{parse_head, Method, RequestHead};
pub use response::{error_code_json, error_json, preflight, reason_phrase, Response};
