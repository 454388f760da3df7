//! Administration messages (PROTOCOL.md §13): what an admin asks, and the
//! answers, written by hand like the other outbound messages.
use super::outbound::{write_array, write_opt_str, write_req_id, write_str};
use std::borrow::Cow;

/// Most entries one `audit_query` returns, and its default.
pub const MAX_AUDIT_LIMIT: u32 = 500;
pub const DEFAULT_AUDIT_LIMIT: u32 = 50;

#[derive(Debug, PartialEq, Eq)]
pub enum Admin<'a> {
    /// A member id, pubkey or display name within the admin's mesh.
    Kick {
        target: Cow<'a, str>,
    },
    Ban {
        target: Cow<'a, str>,
        reason: Option<Cow<'a, str>>,
    },
    Unban {
        target: Cow<'a, str>,
    },
    ListBans,
    AuditQuery {
        limit: u32,
        before_id: Option<Cow<'a, str>>,
        event_type: Option<Cow<'a, str>>,
    },
    AuditVerify,
}

/// One revoked member, for `bans_list`.
pub struct BanEntry<'a> {
    pub member_id: &'a str,
    pub pubkey: &'a str,
    pub display_name: &'a str,
    /// RFC 3339.
    pub revoked_at: &'a str,
}

/// One `mesh.audit_log` row, for `audit_result`.
pub struct AuditEntry<'a> {
    pub id: &'a str,
    pub event_type: &'a str,
    pub actor: Option<&'a str>,
    pub target: Option<&'a str>,
    /// The stored metadata, a JSON object as Postgres prints it.
    pub metadata_json: &'a str,
    /// RFC 3339.
    pub created_at: &'a str,
    pub hash: Option<&'a str>,
}

pub fn write_kick_ack(out: &mut Vec<u8>, kicked: &[&str], req_id: Option<&str>) {
    out.extend_from_slice(b"{\"type\":\"kick_ack\",\"kicked\":");
    write_array(out, kicked, |out, presence_id| write_str(out, presence_id));
    write_req_id(out, req_id);
    out.push(b'}');
}

/// `ban_ack` or `unban_ack`.
pub fn write_ban_ack(out: &mut Vec<u8>, banned: bool, member_id: &str, req_id: Option<&str>) {
    out.extend_from_slice(if banned {
        b"{\"type\":\"ban_ack\",\"memberId\":"
    } else {
        b"{\"type\":\"unban_ack\",\"memberId\":"
    });
    write_str(out, member_id);
    write_req_id(out, req_id);
    out.push(b'}');
}

pub fn write_bans_list(out: &mut Vec<u8>, bans: &[BanEntry<'_>], req_id: Option<&str>) {
    out.extend_from_slice(b"{\"type\":\"bans_list\",\"bans\":");
    write_array(out, bans, |out, ban| {
        out.extend_from_slice(b"{\"memberId\":");
        write_str(out, ban.member_id);
        out.extend_from_slice(b",\"pubkey\":");
        write_str(out, ban.pubkey);
        out.extend_from_slice(b",\"displayName\":");
        write_str(out, ban.display_name);
        out.extend_from_slice(b",\"revokedAt\":");
        write_str(out, ban.revoked_at);
        out.push(b'}');
    });
    write_req_id(out, req_id);
    out.push(b'}');
}

pub fn write_audit_result(out: &mut Vec<u8>, entries: &[AuditEntry<'_>], req_id: Option<&str>) {
    out.extend_from_slice(b"{\"type\":\"audit_result\",\"entries\":");
    write_array(out, entries, |out, entry| {
        out.extend_from_slice(b"{\"id\":");
        write_str(out, entry.id);
        out.extend_from_slice(b",\"eventType\":");
        write_str(out, entry.event_type);
        out.extend_from_slice(b",\"actor\":");
        write_opt_str(out, entry.actor);
        out.extend_from_slice(b",\"target\":");
        write_opt_str(out, entry.target);
        out.extend_from_slice(b",\"metadata\":");
        // Postgres printed it from a jsonb column: valid JSON already.
        out.extend_from_slice(entry.metadata_json.as_bytes());
        out.extend_from_slice(b",\"createdAt\":");
        write_str(out, entry.created_at);
        out.extend_from_slice(b",\"hash\":");
        write_opt_str(out, entry.hash);
        out.push(b'}');
    });
    write_req_id(out, req_id);
    out.push(b'}');
}

/// The chain report of `audit_verify`.
pub struct VerifyResult<'a> {
    pub valid: bool,
    pub entries: u64,
    pub unchained: u64,
    pub broken_at: Option<&'a str>,
}

pub fn write_audit_verify_result(
    out: &mut Vec<u8>,
    result: &VerifyResult<'_>,
    req_id: Option<&str>,
) {
    out.extend_from_slice(b"{\"type\":\"audit_verify_result\",\"valid\":");
    out.extend_from_slice(if result.valid { b"true" } else { b"false" });
    out.extend_from_slice(
        format!(
            ",\"entries\":{},\"unchained\":{}",
            result.entries, result.unchained
        )
        .as_bytes(),
    );
    out.extend_from_slice(b",\"brokenAt\":");
    write_opt_str(out, result.broken_at);
    write_req_id(out, req_id);
    out.push(b'}');
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(out: &[u8]) -> serde_json::Value {
        serde_json::from_slice(out).expect("valid JSON")
    }

    #[test]
    fn answers_have_the_contracts_shapes() {
        let mut out = Vec::new();
        write_kick_ack(&mut out, &["p1", "p\"2"], Some("r"));
        let v = parsed(&out);
        assert_eq!(v["type"], "kick_ack");
        assert_eq!(v["kicked"], serde_json::json!(["p1", "p\"2"]));
        assert_eq!(v["_reqId"], "r");
        out.clear();
        write_ban_ack(&mut out, false, "m1", None);
        assert_eq!(
            parsed(&out),
            serde_json::json!({"type": "unban_ack", "memberId": "m1"})
        );
        out.clear();
        let ban = BanEntry {
            member_id: "m1",
            pubkey: "aa",
            display_name: "eve",
            revoked_at: "2026-12-02T00:00:00.000Z",
        };
        write_bans_list(&mut out, &[ban], None);
        assert_eq!(parsed(&out)["bans"][0]["displayName"], "eve");
        out.clear();
        let entry = AuditEntry {
            id: "a1",
            event_type: "connect",
            actor: Some("m1"),
            target: None,
            metadata_json: r#"{"pid": 1}"#,
            created_at: "2026-12-02T00:00:00.000Z",
            hash: None,
        };
        write_audit_result(&mut out, &[entry], Some("q"));
        let v = parsed(&out);
        assert_eq!(v["entries"][0]["metadata"]["pid"], 1);
        assert_eq!(v["entries"][0]["target"], serde_json::Value::Null);
        out.clear();
        let result = VerifyResult {
            valid: false,
            entries: 3,
            unchained: 1,
            broken_at: Some("a2"),
        };
        write_audit_verify_result(&mut out, &result, None);
        assert_eq!(
            parsed(&out),
            serde_json::json!({"type": "audit_verify_result", "valid": false, "entries": 3,
                "unchained": 1, "brokenAt": "a2"})
        );
    }
}
