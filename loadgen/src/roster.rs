//! The run's meshes and members: fresh ed25519 identities, or those of a
//! `--members FILE`; and the signed hello each session opens with.
use crate::wire::client_frame;
use anyhow::{bail, Context, Result};
use ed25519_dalek::{Signer, SigningKey};
use meshbroker::ws::OpCode;
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

pub struct Member {
    pub id: String,
    /// 64 lowercase hex digits.
    pub pubkey: String,
    pub key: SigningKey,
}

pub struct Mesh {
    pub id: String,
    pub members: Vec<Member>,
}

pub struct Roster {
    pub meshes: Vec<Mesh>,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex32(s: &str) -> Option<[u8; 32]> {
    if s.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// The `--members` file.
#[derive(Serialize, Deserialize)]
struct MembersFile {
    meshes: Vec<MeshFile>,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct MeshFile {
    mesh_id: String,
    members: Vec<MemberFile>,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct MemberFile {
    member_id: String,
    pubkey: String,
    /// 64 hex: the ed25519 seed (or 128 hex: seed followed by the public key).
    secret_key: String,
}

impl Member {
    pub fn generate(id: String) -> Member {
        let key = SigningKey::generate(&mut rand::rngs::OsRng);
        Member {
            id,
            pubkey: hex(key.verifying_key().as_bytes()),
            key,
        }
    }
}

impl Roster {
    /// `meshes` × `peers` fresh members; ids carry `run_id` so concurrent
    /// runs never collide.
    pub fn generate(run_id: &str, meshes: usize, peers: usize) -> Roster {
        Roster {
            meshes: (0..meshes)
                .map(|m| {
                    let id = format!("lg-{run_id}-m{m}");
                    let members = (0..peers)
                        .map(|p| Member::generate(format!("{id}-p{p}")))
                        .collect();
                    Mesh { id, members }
                })
                .collect(),
        }
    }

    /// Accepts `{"meshes":[…]}` or a single `{"meshId":…,"members":[…]}`.
    pub fn load(path: &Path) -> Result<Roster> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("read --members {}", path.display()))?;
        let file: MembersFile = match serde_json::from_str::<MembersFile>(&text) {
            Ok(f) => f,
            Err(_) => MembersFile {
                meshes: vec![serde_json::from_str::<MeshFile>(&text).with_context(|| {
                    format!(
                        "{}: expected {{\"meshes\":[{{\"meshId\",\"members\":[{{\"memberId\",\"pubkey\",\"secretKey\"}}]}}]}}",
                        path.display()
                    )
                })?],
            },
        };
        let mut meshes = Vec::new();
        for mesh in file.meshes {
            let mut members = Vec::new();
            for m in mesh.members {
                let seed = m
                    .secret_key
                    .get(..64)
                    .and_then(unhex32)
                    .with_context(|| format!("member {}: secretKey is not hex", m.member_id))?;
                let key = SigningKey::from_bytes(&seed);
                let pubkey = hex(key.verifying_key().as_bytes());
                if !pubkey.eq_ignore_ascii_case(&m.pubkey) {
                    bail!(
                        "member {}: pubkey does not match its secretKey",
                        m.member_id
                    );
                }
                members.push(Member {
                    id: m.member_id,
                    pubkey,
                    key,
                });
            }
            if members.is_empty() {
                bail!("mesh {} has no members", mesh.mesh_id);
            }
            meshes.push(Mesh {
                id: mesh.mesh_id,
                members,
            });
        }
        if meshes.is_empty() {
            bail!("{}: no meshes", path.display());
        }
        Ok(Roster { meshes })
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        let file = MembersFile {
            meshes: self
                .meshes
                .iter()
                .map(|mesh| MeshFile {
                    mesh_id: mesh.id.clone(),
                    members: mesh
                        .members
                        .iter()
                        .map(|m| MemberFile {
                            member_id: m.id.clone(),
                            pubkey: m.pubkey.clone(),
                            secret_key: hex(&m.key.to_bytes()),
                        })
                        .collect(),
                })
                .collect(),
        };
        std::fs::write(path, serde_json::to_vec_pretty(&file)?)
            .with_context(|| format!("write {}", path.display()))
    }

    pub fn connections(&self) -> usize {
        self.meshes.iter().map(|m| m.members.len()).sum()
    }
}

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// The hello's session fields beyond the member's identity.
#[derive(Clone, Copy, Debug)]
pub struct HelloOptions<'a> {
    pub session_id: &'a str,
    pub timestamp_ms: i64,
    /// Ask for acknowledged delivery (PROTOCOL.md §11).
    pub client_ack: bool,
}

/// The hello JSON, signed over `meshId|memberId|pubkey|timestamp`.
pub fn hello_json(mesh_id: &str, member: &Member, opts: HelloOptions<'_>) -> String {
    let HelloOptions {
        session_id,
        timestamp_ms,
        client_ack,
    } = opts;
    let signed = format!("{mesh_id}|{}|{}|{timestamp_ms}", member.id, member.pubkey);
    let signature = hex(&member.key.sign(signed.as_bytes()).to_bytes());
    let mut hello = serde_json::json!({
        "type": "hello",
        "meshId": mesh_id,
        "memberId": member.id,
        "pubkey": member.pubkey,
        "sessionId": session_id,
        "pid": std::process::id(),
        "cwd": "/nonexistent/meshbroker-loadgen",
        "timestamp": timestamp_ms,
        "signature": signature,
    });
    if client_ack {
        hello["capabilities"] = serde_json::json!(["client_ack"]);
    }
    hello.to_string()
}

pub fn hello_frame(mesh_id: &str, member: &Member, opts: HelloOptions<'_>) -> Vec<u8> {
    client_frame(OpCode::Text, hello_json(mesh_id, member, opts).as_bytes())
}

/// A Claude Code session's own key (PROTOCOL.md §9 `session_hello`).
pub struct SessionKey {
    pub pubkey: String,
    key: SigningKey,
}

impl SessionKey {
    pub fn generate() -> SessionKey {
        let key = SigningKey::generate(&mut rand::rngs::OsRng);
        SessionKey {
            pubkey: hex(key.verifying_key().as_bytes()),
            key,
        }
    }
}

/// How long the parent's attestation of a session key is made valid for.
const ATTESTATION_MS: i64 = 3_600_000;

/// A `session_hello` for `session` under `member`: the member's attestation
/// over `claudemesh-session-attest|parent|session|expiresAt`, and the
/// session's signature over
/// `claudemesh-session-hello|meshId|parent|session|timestamp`.
pub fn session_hello_json(
    mesh_id: &str,
    member: &Member,
    session: &SessionKey,
    opts: HelloOptions<'_>,
) -> String {
    let (parent, key) = (&member.pubkey, &session.pubkey);
    let expires = opts.timestamp_ms + ATTESTATION_MS;
    let attest = format!("claudemesh-session-attest|{parent}|{key}|{expires}");
    let signed = format!(
        "claudemesh-session-hello|{mesh_id}|{parent}|{key}|{}",
        opts.timestamp_ms
    );
    let mut hello = serde_json::json!({
        "type": "session_hello",
        "meshId": mesh_id,
        "parentMemberId": member.id,
        "parentMemberPubkey": parent,
        "sessionPubkey": key,
        "sessionId": opts.session_id,
        "pid": std::process::id(),
        "cwd": "/nonexistent/meshbroker-loadgen",
        "timestamp": opts.timestamp_ms,
        "signature": hex(&session.key.sign(signed.as_bytes()).to_bytes()),
        "parentAttestation": {
            "sessionPubkey": key,
            "parentMemberPubkey": parent,
            "expiresAt": expires,
            "signature": hex(&member.key.sign(attest.as_bytes()).to_bytes()),
        },
    });
    if opts.client_ack {
        hello["capabilities"] = serde_json::json!(["client_ack"]);
    }
    hello.to_string()
}

pub fn session_hello_frame(
    mesh_id: &str,
    member: &Member,
    session: &SessionKey,
    opts: HelloOptions<'_>,
) -> Vec<u8> {
    let json = session_hello_json(mesh_id, member, session, opts);
    client_frame(OpCode::Text, json.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use ed25519_dalek::{Signature, Verifier, VerifyingKey};

    #[test]
    fn hello_signature_verifies_and_file_round_trips() {
        let roster = Roster::generate("t1", 2, 3);
        assert_eq!(roster.connections(), 6);
        let m = &roster.meshes[1].members[2];
        assert_eq!(m.id, "lg-t1-m1-p2");
        let opts = HelloOptions {
            session_id: "s",
            timestamp_ms: 1_764_200_000_000,
            client_ack: false,
        };
        let json: serde_json::Value =
            serde_json::from_str(&hello_json("lg-t1-m1", m, opts)).unwrap();
        assert!(json.get("capabilities").is_none());
        let acking: serde_json::Value = serde_json::from_str(&hello_json(
            "lg-t1-m1",
            m,
            HelloOptions {
                client_ack: true,
                ..opts
            },
        ))
        .unwrap();
        assert_eq!(acking["capabilities"], serde_json::json!(["client_ack"]));
        // The capability is not part of what is signed.
        assert_eq!(acking["signature"], json["signature"]);
        let sig_hex = json["signature"].as_str().unwrap();
        let sig: Vec<u8> = (0..64)
            .map(|i| u8::from_str_radix(&sig_hex[2 * i..2 * i + 2], 16).unwrap())
            .collect();
        let vk = VerifyingKey::from_bytes(&unhex32(&m.pubkey).unwrap()).unwrap();
        let msg = format!("lg-t1-m1|{}|{}|1764200000000", m.id, m.pubkey);
        vk.verify(
            msg.as_bytes(),
            &Signature::from_bytes(&sig.try_into().unwrap()),
        )
        .unwrap();

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("members.json");
        roster.save(&path).unwrap();
        let back = Roster::load(&path).unwrap();
        assert_eq!(back.meshes.len(), 2);
        assert_eq!(back.meshes[1].members[2].pubkey, m.pubkey);
        std::fs::write(&path, r#"{"meshId":"x","members":[]}"#).unwrap();
        assert!(Roster::load(&path).is_err());
    }

    fn verifies(pubkey: &str, sig_hex: &str, msg: &str) -> bool {
        let sig: Vec<u8> = (0..64)
            .map(|i| u8::from_str_radix(&sig_hex[2 * i..2 * i + 2], 16).unwrap())
            .collect();
        let vk = VerifyingKey::from_bytes(&unhex32(pubkey).unwrap()).unwrap();
        vk.verify(
            msg.as_bytes(),
            &Signature::from_bytes(&sig.try_into().unwrap()),
        )
        .is_ok()
    }

    #[test]
    fn session_hello_carries_both_signatures() {
        let roster = Roster::generate("t2", 1, 1);
        let m = &roster.meshes[0].members[0];
        let s = SessionKey::generate();
        let opts = HelloOptions {
            session_id: "s",
            timestamp_ms: 1_764_200_000_000,
            client_ack: false,
        };
        let json: serde_json::Value =
            serde_json::from_str(&session_hello_json("lg-t2-m0", m, &s, opts)).unwrap();
        assert_eq!(json["type"], "session_hello");
        assert_eq!(json["parentMemberId"], m.id.as_str());
        let att = &json["parentAttestation"];
        assert_eq!(att["expiresAt"], 1_764_203_600_000i64);
        let attested = format!(
            "claudemesh-session-attest|{}|{}|1764203600000",
            m.pubkey, s.pubkey
        );
        assert!(verifies(
            &m.pubkey,
            att["signature"].as_str().unwrap(),
            &attested
        ));
        let signed = format!(
            "claudemesh-session-hello|lg-t2-m0|{}|{}|1764200000000",
            m.pubkey, s.pubkey
        );
        assert!(verifies(
            &s.pubkey,
            json["signature"].as_str().unwrap(),
            &signed
        ));
    }
}
