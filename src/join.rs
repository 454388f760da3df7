//! `POST /join` (PROTOCOL.md §12) without I/O: the body's fields, the
//! invite's canonical bytes and signature, and the contract's check order
//! as pure functions over the rows the db side reads.
//!
//! The shard takes the rate-limit token (per client address, before
//! anything else), calls [`validate`] (step 1, the fields, then step 2, the
//! signature), and hands the [`JoinRequest`] to the db thread
//! (`db::join`), which reads the mesh and invite rows inside one
//! transaction and asks [`check_mesh`] (step 3) and [`check_invite`]
//! (step 4) before it looks for an existing member (step 5), takes a use
//! (step 6) and inserts the member (step 7). Every refusal is a
//! [`JoinError`], whose `code` is the `error` of the answer.
//!
//! The same types build an invite for `meshbroker invite`: an
//! [`InvitePayload`] signed by the owner key, its JSON, and its token
//! (base64url of that JSON, which is also the `mesh.invite.token`).

use std::net::IpAddr;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use serde::Serialize;
use simd_json::prelude::*;
use simd_json::BorrowedValue;

use crate::rate::RateLimiter;

/// `/join` requests per client address (`JOIN_RATE_LIMIT_PER_MIN`).
pub type JoinRateLimiter = RateLimiter<IpAddr>;

/// The only invite version there is.
pub const INVITE_VERSION: u32 = 1;
/// `display_name` length in characters (Unicode scalar values).
pub const MAX_DISPLAY_NAME_CHARS: usize = 64;
/// Longest text field of the payload, in bytes (ids, slug, URL, root key).
pub const MAX_FIELD_BYTES: usize = 2048;
/// Longest `invite_token` (base64url of a payload of such fields).
pub const MAX_TOKEN_BYTES: usize = 16 * 1024;

/// The bucket a request counts against: its client address, an IPv4
/// client seen through an IPv6 socket (`::ffff:a.b.c.d`) as itself.
pub fn client_key(ip: IpAddr) -> IpAddr {
    ip.to_canonical()
}

/// `mesh.role`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Admin,
    Member,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Member => "member",
        }
    }

    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "admin" => Some(Role::Admin),
            "member" => Some(Role::Member),
            _ => None,
        }
    }
}

/// A signed invite, as the claudemesh CLI and web app write it. Field
/// order is the wire order (and the token's JSON).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct InvitePayload {
    pub v: u32,
    pub mesh_id: String,
    pub mesh_slug: String,
    pub broker_url: String,
    /// Unix seconds.
    pub expires_at: i64,
    pub mesh_root_key: String,
    pub role: Role,
    /// 64 hex digits, as given (the signature covers this spelling).
    pub owner_pubkey: String,
    /// 128 hex digits.
    pub signature: String,
}

/// What the owner signs, before it is signed.
#[derive(Debug, Clone)]
pub struct InviteFields {
    pub mesh_id: String,
    pub mesh_slug: String,
    pub broker_url: String,
    pub expires_at: i64,
    pub mesh_root_key: String,
    pub role: Role,
}

impl InvitePayload {
    /// The signed bytes:
    /// `v|mesh_id|mesh_slug|broker_url|expires_at|mesh_root_key|role|owner_pubkey`.
    /// Unambiguous because [`validate`] refuses a `|` inside the four free
    /// text fields (the others are digits, hex or a role name).
    pub fn canonical(&self) -> String {
        format!(
            "{}|{}|{}|{}|{}|{}|{}|{}",
            self.v,
            self.mesh_id,
            self.mesh_slug,
            self.broker_url,
            self.expires_at,
            self.mesh_root_key,
            self.role.as_str(),
            self.owner_pubkey
        )
    }

    /// Step 2: ed25519 by `owner_pubkey` over [`canonical`](Self::canonical)
    /// (strict verification, as for a hello).
    pub fn verify(&self) -> Result<(), JoinError> {
        let mut key = [0u8; 32];
        let mut sig = [0u8; 64];
        decode_hex(&self.owner_pubkey, &mut key).ok_or(JoinError::BadSignature)?;
        decode_hex(&self.signature, &mut sig).ok_or(JoinError::BadSignature)?;
        let key = VerifyingKey::from_bytes(&key).map_err(|_| JoinError::BadSignature)?;
        key.verify_strict(self.canonical().as_bytes(), &Signature::from_bytes(&sig))
            .map_err(|_| JoinError::BadSignature)
    }

    /// An invite signed by `owner` (`meshbroker invite`).
    pub fn sign(fields: InviteFields, owner: &SigningKey) -> InvitePayload {
        let mut payload = InvitePayload {
            v: INVITE_VERSION,
            mesh_id: fields.mesh_id,
            mesh_slug: fields.mesh_slug,
            broker_url: fields.broker_url,
            expires_at: fields.expires_at,
            mesh_root_key: fields.mesh_root_key,
            role: fields.role,
            owner_pubkey: hex(owner.verifying_key().as_bytes()),
            signature: String::new(),
        };
        payload.signature = hex(&owner.sign(payload.canonical().as_bytes()).to_bytes());
        payload
    }

    /// The payload as one line of JSON, in wire order.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("a payload always serializes")
    }

    /// base64url (no padding) of [`to_json`](Self::to_json): the invite
    /// link's token, stored as `mesh.invite.token`.
    pub fn token(&self) -> String {
        URL_SAFE_NO_PAD.encode(self.to_json())
    }
}

/// A join whose fields are valid (step 1). `peer_pubkey` is lowercase.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JoinRequest {
    pub invite_token: String,
    pub payload: InvitePayload,
    pub peer_pubkey: String,
    pub display_name: String,
}

/// Why a join was refused; [`code`](Self::code) is the answer's `error`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JoinError {
    /// Step 1: `field` (a dotted path such as `invite_payload.role`) is
    /// missing or not what `expected` says.
    #[error("invalid field {field}: {expected}")]
    InvalidField {
        field: &'static str,
        expected: &'static str,
    },
    #[error("the invite's signature does not verify for its owner_pubkey")]
    BadSignature,
    #[error("no such mesh (or it is archived)")]
    MeshNotFound,
    #[error("the mesh has no owner key: it takes no joins until one is set")]
    MeshMissingOwnerKey,
    #[error("the invite's owner_pubkey is not the mesh's owner key")]
    OwnerMismatch,
    #[error("the invite's mesh_root_key is not the mesh's root key")]
    RootKeyMismatch,
    #[error("no invite with this token")]
    InviteNotFound,
    #[error("the invite is for another mesh")]
    InviteMeshMismatch,
    #[error("the invite was revoked")]
    InviteRevoked,
    #[error("the invite has expired")]
    InviteExpired,
    #[error("the invite's role is not the payload's")]
    InviteRoleMismatch,
    #[error("the invite has no uses left")]
    InviteExhausted,
    #[error("too many join requests from this address; try again in a minute")]
    RateLimited,
    #[error("request body exceeds MAX_MESSAGE_BYTES")]
    TooLarge,
}

impl JoinError {
    pub fn code(&self) -> &'static str {
        match self {
            JoinError::InvalidField { .. } => "invalid_field",
            JoinError::BadSignature => "invite_bad_signature",
            JoinError::MeshNotFound => "mesh_not_found",
            JoinError::MeshMissingOwnerKey => "mesh_missing_owner_key",
            JoinError::OwnerMismatch => "invite_owner_mismatch",
            JoinError::RootKeyMismatch => "invite_root_key_mismatch",
            JoinError::InviteNotFound => "invite_not_found",
            JoinError::InviteMeshMismatch => "invite_mesh_mismatch",
            JoinError::InviteRevoked => "invite_revoked",
            JoinError::InviteExpired => "invite_expired",
            JoinError::InviteRoleMismatch => "invite_role_mismatch",
            JoinError::InviteExhausted => "invite_exhausted",
            JoinError::RateLimited => "rate_limited",
            JoinError::TooLarge => "too_large",
        }
    }

    /// 400 for every refusal of the contract's list.
    pub fn status(&self) -> u16 {
        match self {
            JoinError::RateLimited => 429,
            JoinError::TooLarge => 413,
            _ => 400,
        }
    }
}

fn invalid(field: &'static str, expected: &'static str) -> JoinError {
    JoinError::InvalidField { field, expected }
}

/// Steps 1 and 2: the fields, then the signature. simd-json parses in
/// place, so `body` is clobbered.
pub fn validate(body: &mut [u8]) -> Result<JoinRequest, JoinError> {
    let request = parse_request(body)?;
    request.payload.verify()?;
    Ok(request)
}

/// Step 1 alone: every field present and well-formed. Other fields are
/// ignored.
pub fn parse_request(body: &mut [u8]) -> Result<JoinRequest, JoinError> {
    // Bounded first: the tree is built by recursion (see MAX_JSON_DEPTH).
    if !crate::protocol::nesting_within(body, crate::protocol::MAX_JSON_DEPTH) {
        return Err(invalid("body", "a JSON object"));
    }
    let value = simd_json::to_borrowed_value(body).map_err(|_| invalid("body", "a JSON object"))?;
    let obj = value.as_object().ok_or(invalid("body", "a JSON object"))?;
    let field = |name: &str| obj.get(name).filter(|v| !v.is_null());

    let invite_token = text(
        field("invite_token"),
        "invite_token",
        "a base64url string",
        MAX_TOKEN_BYTES,
    )?;
    if !invite_token
        .trim_end_matches('=')
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err(invalid("invite_token", "a base64url string"));
    }
    let payload = match field("invite_payload") {
        Some(v) if v.is_object() => parse_payload(v)?,
        _ => return Err(invalid("invite_payload", "an object")),
    };
    let peer_pubkey = hex_field(field("peer_pubkey"), "peer_pubkey", 64)?.to_ascii_lowercase();
    let display_name = display_name(field("display_name"))?;
    Ok(JoinRequest {
        invite_token,
        payload,
        peer_pubkey,
        display_name,
    })
}

fn parse_payload(p: &BorrowedValue<'_>) -> Result<InvitePayload, JoinError> {
    let field = |name: &str| p.get(name).filter(|v| !v.is_null());
    match field("v").and_then(as_integer) {
        Some(v) if v == i64::from(INVITE_VERSION) => {}
        _ => return Err(invalid("invite_payload.v", "1")),
    }
    let free_text = |name: &str, path: &'static str| -> Result<String, JoinError> {
        const EXPECTED: &str = "a non-empty string without '|'";
        let s = text(field(name), path, EXPECTED, MAX_FIELD_BYTES)?;
        if s.contains('|') {
            return Err(invalid(path, EXPECTED));
        }
        Ok(s)
    };
    let mesh_id = free_text("mesh_id", "invite_payload.mesh_id")?;
    let mesh_slug = free_text("mesh_slug", "invite_payload.mesh_slug")?;
    let broker_url = free_text("broker_url", "invite_payload.broker_url")?;
    let expires_at = match field("expires_at").and_then(as_integer) {
        Some(t) if t > 0 => t,
        _ => {
            return Err(invalid(
                "invite_payload.expires_at",
                "a positive integer (Unix seconds)",
            ))
        }
    };
    let mesh_root_key = free_text("mesh_root_key", "invite_payload.mesh_root_key")?;
    let role = field("role")
        .and_then(|v| v.as_str())
        .and_then(Role::parse)
        .ok_or(invalid("invite_payload.role", "admin or member"))?;
    let owner_pubkey = hex_field(field("owner_pubkey"), "invite_payload.owner_pubkey", 64)?;
    let signature = hex_field(field("signature"), "invite_payload.signature", 128)?;
    Ok(InvitePayload {
        v: INVITE_VERSION,
        mesh_id,
        mesh_slug,
        broker_url,
        expires_at,
        mesh_root_key,
        role,
        owner_pubkey,
        signature,
    })
}

/// A non-empty string of at most `max` bytes, without NUL (which a
/// Postgres `text` cannot hold).
fn text(
    v: Option<&BorrowedValue<'_>>,
    field: &'static str,
    expected: &'static str,
    max: usize,
) -> Result<String, JoinError> {
    match v.and_then(|v| v.as_str()) {
        Some(s) if !s.is_empty() && s.len() <= max && !s.contains('\0') => Ok(s.to_owned()),
        _ => Err(invalid(field, expected)),
    }
}

fn hex_field(
    v: Option<&BorrowedValue<'_>>,
    field: &'static str,
    digits: usize,
) -> Result<String, JoinError> {
    let expected = if digits == 64 {
        "64 hex digits"
    } else {
        "128 hex digits"
    };
    match v.and_then(|v| v.as_str()) {
        Some(s) if s.len() == digits && s.bytes().all(|b| b.is_ascii_hexdigit()) => {
            Ok(s.to_owned())
        }
        _ => Err(invalid(field, expected)),
    }
}

fn display_name(v: Option<&BorrowedValue<'_>>) -> Result<String, JoinError> {
    const EXPECTED: &str = "1 to 64 characters, not blank, without control characters";
    let name = v
        .and_then(|v| v.as_str())
        .ok_or(invalid("display_name", EXPECTED))?;
    let chars = name.chars().count();
    if chars == 0
        || chars > MAX_DISPLAY_NAME_CHARS
        || name.trim().is_empty()
        || name.chars().any(char::is_control)
    {
        return Err(invalid("display_name", EXPECTED));
    }
    Ok(name.to_owned())
}

/// An integer JSON number (`1.0` and `"1"` are refused).
fn as_integer(v: &BorrowedValue<'_>) -> Option<i64> {
    if v.is_f64() {
        return None;
    }
    v.as_i64()
}

/// The `mesh.mesh` row of the payload's mesh, as step 3 needs it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MeshRow {
    pub archived: bool,
    pub owner_pubkey: Option<String>,
    pub root_key: Option<String>,
}

/// The `mesh.invite` row of the token, as step 4 needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InviteRow {
    pub mesh_id: String,
    pub revoked: bool,
    /// Unix seconds.
    pub expires_at: i64,
    /// `mesh.role` as text.
    pub role: String,
}

/// Step 3. `mesh`: the row with the payload's `mesh_id`, if any.
pub fn check_mesh(payload: &InvitePayload, mesh: Option<&MeshRow>) -> Result<(), JoinError> {
    let mesh = match mesh {
        Some(mesh) if !mesh.archived => mesh,
        _ => return Err(JoinError::MeshNotFound),
    };
    let owner = match mesh.owner_pubkey.as_deref() {
        Some(owner) if !owner.is_empty() => owner,
        _ => return Err(JoinError::MeshMissingOwnerKey),
    };
    if !owner.eq_ignore_ascii_case(&payload.owner_pubkey) {
        return Err(JoinError::OwnerMismatch);
    }
    match mesh.root_key.as_deref() {
        Some(root) if !root.is_empty() && root != payload.mesh_root_key => {
            Err(JoinError::RootKeyMismatch)
        }
        _ => Ok(()),
    }
}

/// Step 4. `invite`: the row whose token is the request's, if any; `now`
/// in Unix seconds. An invite expires at its `expires_at` (not after it).
pub fn check_invite(
    payload: &InvitePayload,
    invite: Option<&InviteRow>,
    now: i64,
) -> Result<(), JoinError> {
    let invite = invite.ok_or(JoinError::InviteNotFound)?;
    if invite.mesh_id != payload.mesh_id {
        return Err(JoinError::InviteMeshMismatch);
    }
    if invite.revoked {
        return Err(JoinError::InviteRevoked);
    }
    if invite.expires_at <= now || payload.expires_at <= now {
        return Err(JoinError::InviteExpired);
    }
    if invite.role != payload.role.as_str() {
        return Err(JoinError::InviteRoleMismatch);
    }
    Ok(())
}

/// `{"ok":true,"memberId":…,"alreadyMember":…}`.
pub fn success_body(member_id: &str, already_member: bool) -> Vec<u8> {
    serde_json::json!({
        "ok": true,
        "memberId": member_id,
        "alreadyMember": already_member,
    })
    .to_string()
    .into_bytes()
}

/// Lowercase hex.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(out, "{b:02x}");
    }
    out
}

/// `hex` (either case) into `out`; `None` unless it is exactly
/// `2 * out.len()` hex digits.
pub fn decode_hex(hex: &str, out: &mut [u8]) -> Option<()> {
    if hex.len() != out.len() * 2 {
        return None;
    }
    for (i, pair) in hex.as_bytes().chunks(2).enumerate() {
        let s = std::str::from_utf8(pair).ok()?;
        out[i] = u8::from_str_radix(s, 16).ok()?;
    }
    Some(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    const NOW: i64 = 1_800_000_000;

    fn owner() -> SigningKey {
        SigningKey::from_bytes(&[7u8; 32])
    }

    fn fields() -> InviteFields {
        InviteFields {
            mesh_id: "mesh-1".into(),
            mesh_slug: "one".into(),
            broker_url: "wss://broker.example/ws".into(),
            expires_at: NOW + 3600,
            mesh_root_key: "cm9vdA".into(),
            role: Role::Member,
        }
    }

    fn payload() -> InvitePayload {
        InvitePayload::sign(fields(), &owner())
    }

    fn body(payload: &InvitePayload) -> Value {
        json!({
            "invite_token": payload.token(),
            "invite_payload": serde_json::to_value(payload).unwrap(),
            "peer_pubkey": "AB".repeat(32),
            "display_name": "alice",
        })
    }

    fn run(v: &Value) -> Result<JoinRequest, JoinError> {
        validate(&mut v.to_string().into_bytes())
    }

    fn field_of(e: JoinError) -> &'static str {
        match e {
            JoinError::InvalidField { field, .. } => field,
            other => panic!("expected invalid_field, got {other:?}"),
        }
    }

    #[test]
    fn canonical_bytes_are_the_contracts() {
        let p = payload();
        assert_eq!(
            p.canonical(),
            format!(
                "1|mesh-1|one|wss://broker.example/ws|{}|cm9vdA|member|{}",
                NOW + 3600,
                p.owner_pubkey
            )
        );
        assert_eq!(p.owner_pubkey, hex(owner().verifying_key().as_bytes()));
        assert_eq!(p.signature.len(), 128);
        p.verify().unwrap();
    }

    #[test]
    fn a_valid_body_parses_and_verifies() {
        let p = payload();
        let r = run(&body(&p)).unwrap();
        assert_eq!(r.payload, p);
        assert_eq!(r.invite_token, p.token());
        assert_eq!(r.peer_pubkey, "ab".repeat(32));
        assert_eq!(r.display_name, "alice");
    }

    #[test]
    fn token_is_base64url_of_the_wire_json() {
        let p = payload();
        let json = URL_SAFE_NO_PAD.decode(p.token()).unwrap();
        let v: Value = serde_json::from_slice(&json).unwrap();
        assert_eq!(v["v"], 1);
        assert_eq!(v["role"], "member");
        assert_eq!(v["expires_at"], NOW + 3600);
        assert_eq!(v["signature"], p.signature.as_str());
        let text = String::from_utf8(json).unwrap();
        assert!(text.starts_with(r#"{"v":1,"mesh_id":"mesh-1","mesh_slug":"one""#));
        assert!(!p.token().contains('='));
    }

    #[test]
    fn every_tampered_signed_field_fails_the_signature() {
        let p = payload();
        let tamper: [(&str, Value); 7] = [
            ("mesh_id", json!("mesh-2")),
            ("mesh_slug", json!("two")),
            ("broker_url", json!("wss://evil.example/ws")),
            ("expires_at", json!(NOW + 7200)),
            ("mesh_root_key", json!("b3RoZXI")),
            ("role", json!("admin")),
            ("owner_pubkey", json!(hex(&[9u8; 32]))),
        ];
        for (name, value) in tamper {
            let mut b = body(&p);
            b["invite_payload"][name] = value;
            assert_eq!(run(&b).unwrap_err(), JoinError::BadSignature, "{name}");
        }
        // A signature by another key, and one that is hex but no signature.
        let mut b = body(&p);
        b["invite_payload"]["signature"] =
            json!(InvitePayload::sign(fields(), &SigningKey::from_bytes(&[8; 32])).signature);
        assert_eq!(run(&b).unwrap_err(), JoinError::BadSignature);
        b["invite_payload"]["signature"] = json!("00".repeat(64));
        assert_eq!(run(&b).unwrap_err(), JoinError::BadSignature);
        // The owner key spelled in uppercase is another signed string.
        b = body(&p);
        b["invite_payload"]["owner_pubkey"] = json!(p.owner_pubkey.to_ascii_uppercase());
        assert_eq!(run(&b).unwrap_err(), JoinError::BadSignature);
    }

    #[test]
    fn fields_are_checked_before_the_signature() {
        let mut b = body(&payload());
        b["invite_payload"]["mesh_id"] = json!("other");
        b["display_name"] = json!("");
        assert_eq!(field_of(run(&b).unwrap_err()), "display_name");
    }

    #[test]
    fn invalid_fields_name_the_field() {
        let p = payload();
        type Mutation = Box<dyn Fn(&mut Value)>;
        let cases: Vec<(&str, Mutation)> = vec![
            ("invite_token", Box::new(|b| b["invite_token"] = json!(""))),
            (
                "invite_token",
                Box::new(|b| b["invite_token"] = json!("a+b/c")),
            ),
            ("invite_token", Box::new(|b| b["invite_token"] = json!(42))),
            (
                "invite_token",
                Box::new(|b| {
                    b.as_object_mut().unwrap().remove("invite_token");
                }),
            ),
            (
                "invite_payload",
                Box::new(|b| b["invite_payload"] = json!("x")),
            ),
            (
                "invite_payload",
                Box::new(|b| b["invite_payload"] = json!(null)),
            ),
            (
                "invite_payload.v",
                Box::new(|b| b["invite_payload"]["v"] = json!(2)),
            ),
            (
                "invite_payload.v",
                Box::new(|b| b["invite_payload"]["v"] = json!("1")),
            ),
            (
                "invite_payload.v",
                Box::new(|b| b["invite_payload"]["v"] = json!(1.0)),
            ),
            (
                "invite_payload.mesh_id",
                Box::new(|b| b["invite_payload"]["mesh_id"] = json!("")),
            ),
            (
                "invite_payload.mesh_id",
                Box::new(|b| b["invite_payload"]["mesh_id"] = json!("a|b")),
            ),
            (
                "invite_payload.mesh_slug",
                Box::new(|b| b["invite_payload"]["mesh_slug"] = json!(7)),
            ),
            (
                "invite_payload.broker_url",
                Box::new(|b| {
                    b["invite_payload"]
                        .as_object_mut()
                        .unwrap()
                        .remove("broker_url");
                }),
            ),
            (
                "invite_payload.expires_at",
                Box::new(|b| b["invite_payload"]["expires_at"] = json!("1735689600")),
            ),
            (
                "invite_payload.expires_at",
                Box::new(|b| b["invite_payload"]["expires_at"] = json!(1735689600.5)),
            ),
            (
                "invite_payload.expires_at",
                Box::new(|b| b["invite_payload"]["expires_at"] = json!(0)),
            ),
            (
                "invite_payload.mesh_root_key",
                Box::new(|b| b["invite_payload"]["mesh_root_key"] = json!("k\u{0}")),
            ),
            (
                "invite_payload.role",
                Box::new(|b| b["invite_payload"]["role"] = json!("owner")),
            ),
            (
                "invite_payload.role",
                Box::new(|b| b["invite_payload"]["role"] = json!("Admin")),
            ),
            (
                "invite_payload.owner_pubkey",
                Box::new(|b| b["invite_payload"]["owner_pubkey"] = json!("ab".repeat(31))),
            ),
            (
                "invite_payload.signature",
                Box::new(|b| b["invite_payload"]["signature"] = json!("zz".repeat(64))),
            ),
            (
                "peer_pubkey",
                Box::new(|b| b["peer_pubkey"] = json!("ab".repeat(33))),
            ),
            ("peer_pubkey", Box::new(|b| b["peer_pubkey"] = json!(null))),
            ("display_name", Box::new(|b| b["display_name"] = json!(""))),
            (
                "display_name",
                Box::new(|b| b["display_name"] = json!("   ")),
            ),
            (
                "display_name",
                Box::new(|b| b["display_name"] = json!("a\nb")),
            ),
            (
                "display_name",
                Box::new(|b| b["display_name"] = json!("é".repeat(65))),
            ),
            (
                "display_name",
                Box::new(|b| b["display_name"] = json!(["alice"])),
            ),
        ];
        for (want, mutate) in cases {
            let mut b = body(&p);
            mutate(&mut b);
            let e = run(&b).unwrap_err();
            assert_eq!(e.code(), "invalid_field");
            assert_eq!(e.status(), 400);
            assert!(e.to_string().contains(want), "{e}");
            assert_eq!(field_of(e), want, "{b}");
        }
        for bad in ["", "{", "[1]", "null", "\"x\""] {
            let e = validate(&mut bad.as_bytes().to_vec()).unwrap_err();
            assert_eq!(field_of(e), "body", "{bad:?}");
        }
    }

    #[test]
    fn display_name_counts_characters() {
        let p = payload();
        let mut b = body(&p);
        b["display_name"] = json!("é".repeat(64));
        assert_eq!(run(&b).unwrap().display_name.chars().count(), 64);
        b["display_name"] = json!("x");
        run(&b).unwrap();
    }

    fn mesh_row() -> MeshRow {
        MeshRow {
            archived: false,
            owner_pubkey: Some(payload().owner_pubkey.to_ascii_uppercase()),
            root_key: Some("cm9vdA".into()),
        }
    }

    #[test]
    fn mesh_checks_in_order() {
        let p = payload();
        assert_eq!(check_mesh(&p, None), Err(JoinError::MeshNotFound));
        let archived = MeshRow {
            archived: true,
            owner_pubkey: None,
            ..mesh_row()
        };
        assert_eq!(
            check_mesh(&p, Some(&archived)),
            Err(JoinError::MeshNotFound)
        );
        let no_owner = MeshRow {
            owner_pubkey: None,
            root_key: Some("other".into()),
            ..mesh_row()
        };
        assert_eq!(
            check_mesh(&p, Some(&no_owner)),
            Err(JoinError::MeshMissingOwnerKey)
        );
        let other_owner = MeshRow {
            owner_pubkey: Some(hex(&[1; 32])),
            root_key: Some("other".into()),
            ..mesh_row()
        };
        assert_eq!(
            check_mesh(&p, Some(&other_owner)),
            Err(JoinError::OwnerMismatch)
        );
        let other_root = MeshRow {
            root_key: Some("other".into()),
            ..mesh_row()
        };
        assert_eq!(
            check_mesh(&p, Some(&other_root)),
            Err(JoinError::RootKeyMismatch)
        );
        // Owner keys compare in any case; a mesh without a root key takes any.
        assert_eq!(check_mesh(&p, Some(&mesh_row())), Ok(()));
        let no_root = MeshRow {
            root_key: None,
            ..mesh_row()
        };
        assert_eq!(check_mesh(&p, Some(&no_root)), Ok(()));
    }

    fn invite_row() -> InviteRow {
        InviteRow {
            mesh_id: "mesh-1".into(),
            revoked: false,
            expires_at: NOW + 3600,
            role: "member".into(),
        }
    }

    #[test]
    fn invite_checks_in_order() {
        let p = payload();
        assert_eq!(check_invite(&p, None, NOW), Err(JoinError::InviteNotFound));
        let all_wrong = InviteRow {
            mesh_id: "mesh-2".into(),
            revoked: true,
            expires_at: NOW - 1,
            role: "admin".into(),
        };
        assert_eq!(
            check_invite(&p, Some(&all_wrong), NOW),
            Err(JoinError::InviteMeshMismatch)
        );
        let revoked = InviteRow {
            mesh_id: "mesh-1".into(),
            ..all_wrong.clone()
        };
        assert_eq!(
            check_invite(&p, Some(&revoked), NOW),
            Err(JoinError::InviteRevoked)
        );
        let expired = InviteRow {
            revoked: false,
            ..revoked
        };
        assert_eq!(
            check_invite(&p, Some(&expired), NOW),
            Err(JoinError::InviteExpired)
        );
        let wrong_role = InviteRow {
            role: "admin".into(),
            ..invite_row()
        };
        assert_eq!(
            check_invite(&p, Some(&wrong_role), NOW),
            Err(JoinError::InviteRoleMismatch)
        );
        assert_eq!(check_invite(&p, Some(&invite_row()), NOW), Ok(()));
    }

    #[test]
    fn either_expiry_counts_and_the_instant_itself_is_expired() {
        let p = payload();
        let row = invite_row();
        assert_eq!(
            check_invite(&p, Some(&row), p.expires_at),
            Err(JoinError::InviteExpired)
        );
        assert_eq!(check_invite(&p, Some(&row), p.expires_at - 1), Ok(()));
        let short = InviteRow {
            expires_at: NOW + 10,
            ..row
        };
        assert_eq!(
            check_invite(&p, Some(&short), NOW + 10),
            Err(JoinError::InviteExpired)
        );
        let mut late = p.clone();
        late.expires_at = NOW;
        assert_eq!(
            check_invite(&late, Some(&invite_row()), NOW),
            Err(JoinError::InviteExpired)
        );
    }

    #[test]
    fn codes_and_statuses() {
        let all = [
            (invalid("x", "y"), "invalid_field", 400),
            (JoinError::BadSignature, "invite_bad_signature", 400),
            (JoinError::MeshNotFound, "mesh_not_found", 400),
            (
                JoinError::MeshMissingOwnerKey,
                "mesh_missing_owner_key",
                400,
            ),
            (JoinError::OwnerMismatch, "invite_owner_mismatch", 400),
            (JoinError::RootKeyMismatch, "invite_root_key_mismatch", 400),
            (JoinError::InviteNotFound, "invite_not_found", 400),
            (JoinError::InviteMeshMismatch, "invite_mesh_mismatch", 400),
            (JoinError::InviteRevoked, "invite_revoked", 400),
            (JoinError::InviteExpired, "invite_expired", 400),
            (JoinError::InviteRoleMismatch, "invite_role_mismatch", 400),
            (JoinError::InviteExhausted, "invite_exhausted", 400),
            (JoinError::RateLimited, "rate_limited", 429),
            (JoinError::TooLarge, "too_large", 413),
        ];
        for (e, code, status) in all {
            assert_eq!((e.code(), e.status()), (code, status));
            assert!(!e.to_string().is_empty());
        }
    }

    #[test]
    fn success_body_shape() {
        let v: Value = serde_json::from_slice(&success_body("m-1", true)).unwrap();
        assert_eq!(
            v,
            json!({"ok": true, "memberId": "m-1", "alreadyMember": true})
        );
    }

    #[test]
    fn mapped_ipv4_counts_as_ipv4() {
        let mapped: IpAddr = "::ffff:10.1.2.3".parse().unwrap();
        assert_eq!(client_key(mapped), "10.1.2.3".parse::<IpAddr>().unwrap());
        let v6: IpAddr = "2001:db8::1".parse().unwrap();
        assert_eq!(client_key(v6), v6);
    }
}
