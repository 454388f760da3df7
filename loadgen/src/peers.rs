//! The `peers` scenario's plan and accounting (PROTOCOL.md §9 `list_peers`,
//! §10 groups): who does what in each mesh, each lister's requests in
//! flight matched to their answers by `_reqId`, and a cheap reading of a
//! `peers_list` answer (its entries, `self` marks and echoed `_reqId`).
//!
//! Roles in a mesh of N members, by index:
//! - `0..senders`: broadcast senders (`*`, as in `broadcast`);
//! - `senders`, when group sends are on: the group sender (`@group`);
//! - `N - listers..N`: the listers, issuing `list_peers`;
//! - everyone else only receives. Whatever its role, every
//!   `group_every`-th member (0, K, 2K, …) joins the group after its hello.
use crate::stats::Pacer;
use crate::wire::SendTemplate;
use anyhow::{bail, Result};
use serde::Deserialize;
use std::collections::HashMap;
use std::ops::Range;

/// What one member of a mesh does during the load.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Receiver,
    /// Sends `*` broadcasts (closed loop or `--rate`).
    Sender,
    /// Sends to the group target at `--group-rate`.
    GroupSender,
    /// Issues `list_peers` at `--list-rate`.
    Lister,
}

/// Whether member `p` joins the group when every `every`-th one does.
pub fn joins_group(p: usize, every: usize) -> bool {
    every > 0 && p.is_multiple_of(every)
}

/// Whether a send to `target` (`@name` or `#name`) reaches members of
/// `group`: the same group or one below it (PROTOCOL.md §10), in lowercase.
/// Computed here, not taken from the broker, so a broker that gets it
/// wrong shows up as lost or unexpected pushes.
pub fn target_covers(target: &str, group: &str) -> bool {
    let Some(name) = target
        .strip_prefix('@')
        .or_else(|| target.strip_prefix('#'))
    else {
        return false;
    };
    let (name, group) = (name.to_ascii_lowercase(), group.to_ascii_lowercase());
    match group.strip_prefix(name.as_str()) {
        Some(rest) => rest.is_empty() || rest.starts_with('/'),
        None => false,
    }
}

/// The roles in one mesh.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MeshRoles {
    /// Sessions in the mesh: every `peers_list` must have this many entries.
    pub size: usize,
    pub senders: usize,
    pub group_sender: Option<u32>,
    pub listers: Range<u32>,
    /// Members that join the group.
    pub group_members: usize,
    /// Pushes one group send calls for: the group's members but the sender's.
    pub group_expected: u64,
}

impl MeshRoles {
    pub fn new(
        size: usize,
        senders: usize,
        group_sends: bool,
        listers: usize,
        group_every: usize,
    ) -> Result<MeshRoles> {
        let group_sender = group_sends.then_some(senders as u32);
        if senders + group_sends as usize + listers > size {
            bail!(
                "a mesh of {size} members cannot hold {senders} broadcast senders, {} group sender and {listers} listers",
                group_sends as usize
            );
        }
        let group_members = (0..size).filter(|&p| joins_group(p, group_every)).count();
        let sender_joins = group_sender.is_some_and(|g| joins_group(g as usize, group_every));
        let group_expected = (group_members - sender_joins as usize) as u64;
        if group_sends && group_expected == 0 {
            bail!("a mesh of {size} members has no group member but the group sender (lower --group-every)");
        }
        Ok(MeshRoles {
            size,
            senders,
            group_sender,
            listers: (size - listers) as u32..size as u32,
            group_members,
            group_expected,
        })
    }

    pub fn role(&self, member: u32) -> Role {
        if (member as usize) < self.senders {
            Role::Sender
        } else if self.group_sender == Some(member) {
            Role::GroupSender
        } else if self.listers.contains(&member) {
            Role::Lister
        } else {
            Role::Receiver
        }
    }
}

/// What the `peers` scenario adds to a run.
pub struct PeersPlan {
    pub meshes: Vec<MeshRoles>,
    pub group_every: usize,
    /// `join_group` for the group.
    pub join_frame: Vec<u8>,
    /// A send to the group target.
    pub group_template: SendTemplate,
    /// Group sends per second of each group sender (0: none).
    pub group_rate_per_sender: f64,
    /// `list_peers` per second of each lister.
    pub list_rate_per_lister: f64,
}

impl PeersPlan {
    pub fn joins(&self, member: u32) -> bool {
        joins_group(member as usize, self.group_every)
    }

    pub fn role(&self, mesh: u32, member: u32) -> Role {
        self.meshes[mesh as usize].role(member)
    }
}

/// A group sender's or lister's state in the worker.
#[derive(Clone, Debug)]
pub struct PeersConn {
    pub role: Role,
    /// Its schedule, from the start of the load (none: nothing to send).
    pub pacer: Option<Pacer>,
    /// A lister's requests in flight.
    pub ledger: ListLedger,
    /// A lister's answers so far (every [`CROSS_CHECK_EVERY`]-th, the
    /// first included, is also read by the JSON parser).
    pub answers: u64,
}

impl PeersConn {
    pub fn new(role: Role) -> PeersConn {
        PeersConn {
            role,
            pacer: None,
            ledger: ListLedger::default(),
            answers: 0,
        }
    }
}

/// How often a lister checks [`scan_peers_list`] against [`parse_peers_list`].
pub const CROSS_CHECK_EVERY: u64 = 16;

/// One lister's `list_peers` in flight, by `_reqId` (its own sequence,
/// in decimal).
#[derive(Clone, Debug, Default)]
pub struct ListLedger {
    next: u64,
    /// Request sequence → its intended send time (ns).
    pending: HashMap<u64, u64>,
}

impl ListLedger {
    /// A new request due at `intended_ns`; its `_reqId`.
    pub fn issue(&mut self, intended_ns: u64) -> u64 {
        let seq = self.next;
        self.next += 1;
        self.pending.insert(seq, intended_ns);
        seq
    }

    /// The answer echoing `req_id`: the request's intended send time, or
    /// `None` when no request of ours with that id is in flight (an
    /// unknown id, or one answered already).
    pub fn answer(&mut self, req_id: &[u8]) -> Option<u64> {
        let seq = std::str::from_utf8(req_id).ok()?.parse::<u64>().ok()?;
        self.pending.remove(&seq)
    }

    pub fn outstanding(&self) -> usize {
        self.pending.len()
    }
}

/// What a `peers_list` answer says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListAnswer {
    pub req_id: Option<String>,
    pub entries: usize,
    /// Entries marked `"self":true`.
    pub selves: usize,
}

const PRESENCE_KEY: &[u8] = b"\"presenceId\":";
const SELF_TRUE: &[u8] = b"\"self\":true";
const REQ_ID_KEY: &[u8] = b"\"_reqId\":\"";

/// Reads a `peers_list` as the broker writes it without building a tree:
/// entries are counted by their `"presenceId":` keys and `self` marks by
/// `"self":true`; the `_reqId` is the last one, after the array. Inside a
/// JSON string a quote is always escaped, so these byte sequences occur
/// only as keys. `None`: not a `peers_list`. [`parse_peers_list`] reads the
/// same with a JSON parser, to check this reading now and then.
pub fn scan_peers_list(payload: &[u8]) -> Option<ListAnswer> {
    if !payload.starts_with(crate::wire::PEERS_LIST_PREFIX) {
        return None;
    }
    let entries = memchr::memmem::find_iter(payload, PRESENCE_KEY).count();
    let selves = memchr::memmem::find_iter(payload, SELF_TRUE).count();
    let req_id = memchr::memmem::rfind(payload, REQ_ID_KEY).and_then(|at| {
        let rest = &payload[at + REQ_ID_KEY.len()..];
        let end = memchr::memchr(b'"', rest)?;
        Some(String::from_utf8_lossy(&rest[..end]).into_owned())
    });
    Some(ListAnswer {
        req_id,
        entries,
        selves,
    })
}

#[derive(Deserialize)]
struct FullList {
    #[serde(rename = "type")]
    kind: String,
    peers: Vec<FullEntry>,
    #[serde(rename = "_reqId")]
    req_id: Option<String>,
}

#[derive(Deserialize)]
struct FullEntry {
    #[serde(rename = "presenceId")]
    _presence_id: String,
    #[serde(rename = "self")]
    is_self: bool,
}

/// A `peers_list` read by a JSON parser (every entry must have a
/// `presenceId` and a `self`). `None`: not valid JSON of that shape.
pub fn parse_peers_list(payload: &[u8]) -> Option<ListAnswer> {
    let list: FullList = serde_json::from_slice(payload).ok()?;
    if list.kind != "peers_list" {
        return None;
    }
    Some(ListAnswer {
        req_id: list.req_id,
        entries: list.peers.len(),
        selves: list.peers.iter().filter(|p| p.is_self).count(),
    })
}

/// What is wrong with an answer to a request of ours.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Not exactly the mesh's sessions (after the settle, with no session
    /// coming or going, every answer must list them all).
    Count { got: usize, want: usize },
    /// Not exactly one entry marked `self`.
    SelfMarks(usize),
}

/// Checks an answer against the mesh's session count.
pub fn check_answer(answer: &ListAnswer, sessions: usize) -> Result<(), Fault> {
    if answer.entries != sessions {
        return Err(Fault::Count {
            got: answer.entries,
            want: sessions,
        });
    }
    if answer.selves != 1 {
        return Err(Fault::SelfMarks(answer.selves));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(n: usize, is_self: bool) -> String {
        format!(
            r#"{{"pubkey":"ab","memberId":"m{n}","displayName":"tricky \"presenceId\":\"x\" \"self\":true \"_reqId\":\"9\"","presenceId":"p{n}","sessionId":"s","status":"idle","statusSource":"jsonl","summary":null,"groups":[{{"name":"load/g","role":null}}],"cwd":"/x","connectedAt":"t","away":false,"self":{is_self}}}"#
        )
    }

    fn list(n: usize, me: usize, req_id: Option<&str>) -> String {
        let peers: Vec<String> = (0..n).map(|i| entry(i, i == me)).collect();
        let tail = req_id.map_or(String::new(), |r| format!(r#","_reqId":"{r}""#));
        format!(
            r#"{{"type":"peers_list","peers":[{}]{tail}}}"#,
            peers.join(",")
        )
    }

    #[test]
    fn scan_agrees_with_the_parser() {
        for (n, me, req) in [(0, 0, None), (1, 0, Some("0")), (5, 3, Some("123"))] {
            let text = list(n, me, req);
            let scanned = scan_peers_list(text.as_bytes()).unwrap();
            assert_eq!(Some(&scanned), parse_peers_list(text.as_bytes()).as_ref());
            assert_eq!(scanned.entries, n);
            assert_eq!(scanned.selves, usize::from(n > 0));
            assert_eq!(scanned.req_id.as_deref(), req);
        }
        assert_eq!(scan_peers_list(br#"{"type":"push"}"#), None);
        assert_eq!(
            parse_peers_list(br#"{"type":"peers_list","peers":[{}]}"#),
            None
        );
        assert_eq!(
            parse_peers_list(b"{\"type\":\"peers_list\",\"peers\":["),
            None
        );
    }

    #[test]
    fn answers_are_checked_against_the_mesh() {
        let ok = ListAnswer {
            req_id: Some("1".into()),
            entries: 10,
            selves: 1,
        };
        assert_eq!(check_answer(&ok, 10), Ok(()));
        assert_eq!(
            check_answer(&ok, 11),
            Err(Fault::Count { got: 10, want: 11 })
        );
        let two = ListAnswer { selves: 2, ..ok };
        assert_eq!(check_answer(&two, 10), Err(Fault::SelfMarks(2)));
    }

    #[test]
    fn ledger_matches_answers_by_req_id_once() {
        let mut l = ListLedger::default();
        let a = l.issue(100);
        let b = l.issue(200);
        assert_eq!((a, b), (0, 1));
        assert_eq!(l.outstanding(), 2);
        // Out of order is fine; each id is answered once.
        assert_eq!(l.answer(b"1"), Some(200));
        assert_eq!(l.answer(b"1"), None);
        assert_eq!(l.answer(b"7"), None);
        assert_eq!(l.answer(b"x"), None);
        assert_eq!(l.answer(b""), None);
        assert_eq!(l.outstanding(), 1);
        assert_eq!(l.answer(b"0"), Some(100));
        assert_eq!(l.outstanding(), 0);
    }

    #[test]
    fn targets_cover_their_group_and_below() {
        assert!(target_covers("@load", "load/g"));
        assert!(target_covers("@load/g", "load/g"));
        assert!(target_covers("#LOAD", "load/g/x"));
        assert!(!target_covers("@lo", "load/g"));
        assert!(!target_covers("@load/g/x", "load/g"));
        assert!(!target_covers("load", "load"));
        assert!(!target_covers("*", "load"));
    }

    #[test]
    fn roles_in_a_mesh() {
        let r = MeshRoles::new(12, 2, true, 3, 4).unwrap();
        let roles: Vec<Role> = (0..12).map(|m| r.role(m)).collect();
        assert_eq!(
            &roles[..3],
            &[Role::Sender, Role::Sender, Role::GroupSender]
        );
        assert!(roles[3..9].iter().all(|&x| x == Role::Receiver));
        assert!(roles[9..].iter().all(|&x| x == Role::Lister));
        // Members 0, 4 and 8 join; the group sender (2) is not one of them.
        assert_eq!((r.group_members, r.group_expected), (3, 3));
        // A group sender in the group does not count itself.
        let r = MeshRoles::new(12, 0, true, 3, 4).unwrap();
        assert_eq!(r.group_sender, Some(0));
        assert_eq!((r.group_members, r.group_expected), (3, 2));
        // No group sends: no group sender.
        let r = MeshRoles::new(5, 1, false, 4, 1).unwrap();
        assert_eq!(r.group_sender, None);
        assert_eq!(r.role(0), Role::Sender);
        assert!(MeshRoles::new(5, 1, true, 4, 1).is_err());
        // The group sender alone in its group.
        assert!(MeshRoles::new(3, 0, true, 1, 4).is_err());
        assert!(joins_group(0, 4) && joins_group(8, 4) && !joins_group(3, 4));
    }
}
