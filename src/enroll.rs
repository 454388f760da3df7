//! The self-hosted onboarding commands (PROTOCOL.md §12 without the web
//! app): `meshbroker mesh create` makes a mesh owned by an ed25519 key, and
//! `meshbroker invite` signs an invite with that key, stores it as a
//! `mesh.invite` row and prints what a new member needs to `POST /join`.
//!
//! The owner key file holds the 32-byte ed25519 secret key (the seed) as
//! 64 hex digits and a newline. `mesh create` makes one (mode 0600) when
//! the file does not exist and prints its public key; `invite` only reads
//! one. Whoever holds the file can invite anyone into the mesh.
use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context as _};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use ed25519_dalek::SigningKey;

use crate::db::join::{self as db_join, InviteMesh, NewInvite, NewMesh};
use crate::join::{decode_hex, hex, InviteFields, InvitePayload, Role};

/// `meshbroker mesh create`'s owner when no `--owner-user` is given:
/// `mesh.mesh.owner_user_id` is the web app's user id and is required.
pub const DEFAULT_OWNER_USER: &str = "self-hosted";
/// How long an invite is good for when no `--expires` is given.
pub const DEFAULT_EXPIRES: Duration = Duration::from_secs(7 * 24 * 60 * 60);
/// The scheme the claudemesh CLI reads an invite link in.
pub const LINK_PREFIX: &str = "ic://join/";

pub const MESH_CREATE_USAGE: &str = "\
usage: meshbroker mesh create --name NAME [--slug SLUG] --owner-key FILE [--owner-user ID]
  --name        the mesh's name
  --slug        its unique slug (default: the name, lowercased, with '-' for other characters)
  --owner-key   the owner's ed25519 secret key, 64 hex digits (created, mode 0600, if missing)
  --owner-user  mesh.mesh.owner_user_id (default: self-hosted; on a database shared
                with the claudemesh web app, an existing user id)";

pub const INVITE_USAGE: &str = "\
usage: meshbroker invite --mesh ID --owner-key FILE [--max-uses N] [--expires 7d]
                         [--role member|admin] [--broker-url URL]
  --mesh        the mesh's id
  --owner-key   the key file given to `mesh create` (its pubkey must be the mesh's owner_pubkey)
  --max-uses    how many members may join with it (default 1)
  --expires     how long it is good for, e.g. 30m, 12h, 7d (default 7d)
  --role        the role it gives (default member)
  --broker-url  the WebSocket URL members connect to (default ws://localhost:BROKER_PORT/ws)";

/// A command line the command cannot take (exit code 2, with its usage).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{0}")]
pub struct UsageError(pub String);

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeshCreateArgs {
    pub name: String,
    pub slug: String,
    pub owner_key: PathBuf,
    pub owner_user: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InviteArgs {
    pub mesh_id: String,
    pub owner_key: PathBuf,
    pub max_uses: i32,
    pub expires: Duration,
    pub role: Role,
    pub broker_url: Option<String>,
}

/// `--flag value` pairs (also `--flag=value`); every flag takes a value
/// and may be given once.
fn flags<'a>(
    args: &'a [String],
    known: &[&'static str],
) -> Result<Vec<(&'static str, &'a str)>, UsageError> {
    let mut out: Vec<(&'static str, &'a str)> = Vec::new();
    let mut i = 0;
    while i < args.len() {
        let arg = args[i].as_str();
        let (name, inline) = match arg.split_once('=') {
            Some((name, value)) if name.starts_with("--") => (name, Some(value)),
            _ => (arg, None),
        };
        let Some(flag) = known.iter().find(|k| **k == name) else {
            return Err(UsageError(format!("unknown argument {arg:?}")));
        };
        let value = match inline {
            Some(value) => value,
            None => {
                i += 1;
                args.get(i)
                    .map(String::as_str)
                    .ok_or_else(|| UsageError(format!("{flag} needs a value")))?
            }
        };
        if out.iter().any(|(f, _)| f == flag) {
            return Err(UsageError(format!("{flag} given twice")));
        }
        out.push((flag, value));
        i += 1;
    }
    Ok(out)
}

fn get<'a>(flags: &[(&'static str, &'a str)], name: &str) -> Option<&'a str> {
    flags.iter().find(|(f, _)| *f == name).map(|(_, v)| *v)
}

fn required<'a>(flags: &[(&'static str, &'a str)], name: &str) -> Result<&'a str, UsageError> {
    match get(flags, name) {
        Some(v) if !v.trim().is_empty() => Ok(v),
        _ => Err(UsageError(format!("{name} is required"))),
    }
}

/// The arguments after `mesh create`.
pub fn parse_mesh_create(args: &[String]) -> Result<MeshCreateArgs, UsageError> {
    let f = flags(args, &["--name", "--slug", "--owner-key", "--owner-user"])?;
    let name = required(&f, "--name")?.trim().to_owned();
    let slug = match get(&f, "--slug") {
        Some(s) if valid_slug(s) => s.to_owned(),
        Some(s) => {
            return Err(UsageError(format!(
                "--slug {s:?}: expected lowercase letters, digits and '-'"
            )))
        }
        None => slugify(&name),
    };
    if slug.is_empty() {
        return Err(UsageError(
            "--name has no letter or digit to make a slug of: give --slug".to_owned(),
        ));
    }
    Ok(MeshCreateArgs {
        name,
        slug,
        owner_key: PathBuf::from(required(&f, "--owner-key")?),
        owner_user: get(&f, "--owner-user")
            .unwrap_or(DEFAULT_OWNER_USER)
            .to_owned(),
    })
}

/// The arguments after `invite`.
pub fn parse_invite(args: &[String]) -> Result<InviteArgs, UsageError> {
    let f = flags(
        args,
        &[
            "--mesh",
            "--owner-key",
            "--max-uses",
            "--expires",
            "--role",
            "--broker-url",
        ],
    )?;
    let max_uses = match get(&f, "--max-uses") {
        None => 1,
        Some(n) => n
            .parse::<i32>()
            .ok()
            .filter(|n| *n >= 1)
            .ok_or_else(|| UsageError(format!("--max-uses {n:?}: expected an integer ≥ 1")))?,
    };
    let expires = match get(&f, "--expires") {
        None => DEFAULT_EXPIRES,
        Some(d) => humantime::parse_duration(d)
            .ok()
            .filter(|d| d.as_secs() >= 1 && d.as_secs() <= crate::config::MAX_SECONDS)
            .ok_or_else(|| {
                UsageError(format!(
                    "--expires {d:?}: expected a duration such as 30m, 12h or 7d"
                ))
            })?,
    };
    let role = match get(&f, "--role") {
        None => Role::Member,
        Some(r) => Role::parse(r)
            .ok_or_else(|| UsageError(format!("--role {r:?}: expected member or admin")))?,
    };
    let broker_url = get(&f, "--broker-url").map(str::to_owned);
    if broker_url
        .as_deref()
        .is_some_and(|u| u.is_empty() || u.contains('|'))
    {
        return Err(UsageError(
            "--broker-url: expected a URL (without '|')".to_owned(),
        ));
    }
    Ok(InviteArgs {
        mesh_id: required(&f, "--mesh")?.to_owned(),
        owner_key: PathBuf::from(required(&f, "--owner-key")?),
        max_uses,
        expires,
        role,
        broker_url,
    })
}

fn valid_slug(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// `My Mesh!` → `my-mesh`.
pub fn slugify(name: &str) -> String {
    let mut slug = String::with_capacity(name.len());
    for c in name.chars() {
        if c.is_ascii_alphanumeric() {
            slug.push(c.to_ascii_lowercase());
        } else if !slug.is_empty() && !slug.ends_with('-') {
            slug.push('-');
        }
    }
    slug.trim_end_matches('-').to_owned()
}

/// The secret key in a key file's text (64 hex digits, whitespace around).
pub fn parse_key_file(text: &str) -> Option<SigningKey> {
    let mut seed = [0u8; 32];
    decode_hex(text.trim(), &mut seed)?;
    Some(SigningKey::from_bytes(&seed))
}

/// The owner key at `path`; with `create`, a new one is written there
/// (mode 0600) when the file does not exist. The bool: it was created.
pub fn load_owner_key(path: &Path, create: bool) -> anyhow::Result<(SigningKey, bool)> {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let key = parse_key_file(&text).ok_or_else(|| {
                anyhow!(
                    "{}: expected an ed25519 secret key as 64 hex digits",
                    path.display()
                )
            })?;
            Ok((key, false))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && create => {
            let mut seed = [0u8; 32];
            getrandom::getrandom(&mut seed).map_err(|e| anyhow!("no randomness: {e}"))?;
            let key = SigningKey::from_bytes(&seed);
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
                .with_context(|| format!("cannot create {}", path.display()))?;
            writeln!(file, "{}", hex(&seed))
                .and_then(|()| file.sync_all())
                .with_context(|| format!("cannot write {}", path.display()))?;
            Ok((key, true))
        }
        Err(e) => Err(anyhow!("cannot read {}: {e}", path.display())),
    }
}

fn pubkey_of(key: &SigningKey) -> String {
    hex(key.verifying_key().as_bytes())
}

/// 32 random bytes, base64url: a new mesh's `root_key`.
fn new_root_key() -> anyhow::Result<String> {
    let mut bytes = [0u8; 32];
    getrandom::getrandom(&mut bytes).map_err(|e| anyhow!("no randomness: {e}"))?;
    Ok(URL_SAFE_NO_PAD.encode(bytes))
}

/// `meshbroker mesh create`: returns what to print.
pub fn mesh_create(args: &MeshCreateArgs, database_url: &str) -> anyhow::Result<String> {
    let (key, created) = load_owner_key(&args.owner_key, true)?;
    let owner_pubkey = pubkey_of(&key);
    let mesh = db_join::create_mesh_blocking(
        database_url,
        &NewMesh {
            name: args.name.clone(),
            slug: args.slug.clone(),
            owner_user_id: args.owner_user.clone(),
            owner_pubkey: owner_pubkey.clone(),
            root_key: new_root_key()?,
        },
    )
    .context("cannot create the mesh")?;
    let key_line = if created {
        format!(
            "owner key: created {} (keep it secret: it signs this mesh's invites)",
            args.owner_key.display()
        )
    } else {
        format!("owner key: {}", args.owner_key.display())
    };
    Ok(format!(
        "{key_line}\nowner pubkey: {owner_pubkey}\nmesh: {}\nname: {}\nslug: {}\n",
        mesh.id, mesh.name, mesh.slug
    ))
}

/// `meshbroker invite`: returns what to print. `default_broker_url` is
/// used without `--broker-url`.
pub fn invite(
    args: &InviteArgs,
    database_url: &str,
    default_broker_url: &str,
) -> anyhow::Result<String> {
    let (key, _) = load_owner_key(&args.owner_key, false)?;
    let owner_pubkey = pubkey_of(&key);
    let Some(mesh) = db_join::invite_mesh_blocking(database_url, &args.mesh_id)? else {
        bail!("no mesh {:?} (or it is archived)", args.mesh_id);
    };
    let InviteMesh {
        slug,
        owner_user_id,
        owner_pubkey: mesh_owner,
        root_key,
    } = mesh;
    match mesh_owner.as_deref() {
        None | Some("") => bail!(
            "mesh {:?} has no owner_pubkey, so it takes no joins; set mesh.mesh.owner_pubkey \
             to {owner_pubkey} (this key's) to let it sign invites",
            args.mesh_id
        ),
        Some(owner) if !owner.eq_ignore_ascii_case(&owner_pubkey) => bail!(
            "{} is not the owner key of mesh {:?} (its owner_pubkey is {owner})",
            args.owner_key.display(),
            args.mesh_id
        ),
        Some(_) => {}
    }
    let root_key = match root_key.filter(|k| !k.is_empty()) {
        Some(k) => k,
        // A mesh made without one (not by `mesh create`): give it one, which
        // every invite from now on carries.
        None => db_join::ensure_root_key_blocking(database_url, &args.mesh_id, &new_root_key()?)?,
    };
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let expires_secs = now + args.expires.as_secs();
    let expires_at = UNIX_EPOCH + Duration::from_secs(expires_secs);
    let broker_url = args
        .broker_url
        .clone()
        .unwrap_or_else(|| default_broker_url.to_owned());
    let payload = InvitePayload::sign(
        InviteFields {
            mesh_id: args.mesh_id.clone(),
            mesh_slug: slug.clone(),
            broker_url,
            expires_at: i64::try_from(expires_secs).unwrap_or(i64::MAX),
            mesh_root_key: root_key,
            role: args.role,
        },
        &key,
    );
    let token = payload.token();
    let id = db_join::create_invite_blocking(
        database_url,
        &NewInvite {
            mesh_id: args.mesh_id.clone(),
            token: token.clone(),
            max_uses: args.max_uses,
            role: args.role,
            expires_at,
            created_by: owner_user_id,
        },
    )
    .context("cannot store the invite")?;
    Ok(format!(
        "invite: {id}\nmesh: {} ({slug})\nrole: {}\nmax uses: {}\nexpires: {} ({expires_secs})\n\
         payload: {}\ntoken: {token}\nlink: {LINK_PREFIX}{token}\n",
        args.mesh_id,
        args.role.as_str(),
        args.max_uses,
        humantime::format_rfc3339_seconds(expires_at),
        payload.to_json(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &[&str]) -> Vec<String> {
        s.iter().map(|a| a.to_string()).collect()
    }

    #[test]
    fn mesh_create_arguments() {
        let a = parse_mesh_create(&args(&["--name", "My Mesh!", "--owner-key", "/k"])).unwrap();
        assert_eq!(a.slug, "my-mesh");
        assert_eq!(a.owner_user, DEFAULT_OWNER_USER);
        assert_eq!(a.owner_key, PathBuf::from("/k"));
        let a = parse_mesh_create(&args(&[
            "--name=Team",
            "--slug=team-7",
            "--owner-key=/k",
            "--owner-user",
            "u-1",
        ]))
        .unwrap();
        assert_eq!((a.slug.as_str(), a.owner_user.as_str()), ("team-7", "u-1"));
        for bad in [
            &["--owner-key", "/k"][..],
            &["--name", "x"],
            &["--name", "x", "--owner-key"],
            &["--name", "x", "--owner-key", "/k", "--slug", "Bad Slug"],
            &["--name", "!!!", "--owner-key", "/k"],
            &["--name", "x", "--name", "y", "--owner-key", "/k"],
            &["--name", "x", "--owner-key", "/k", "extra"],
        ] {
            assert!(parse_mesh_create(&args(bad)).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn invite_arguments() {
        let a = parse_invite(&args(&["--mesh", "m1", "--owner-key", "/k"])).unwrap();
        assert_eq!(
            (a.max_uses, a.expires, a.role, a.broker_url),
            (1, DEFAULT_EXPIRES, Role::Member, None)
        );
        let a = parse_invite(&args(&[
            "--mesh",
            "m1",
            "--owner-key",
            "/k",
            "--max-uses",
            "5",
            "--expires",
            "12h",
            "--role",
            "admin",
            "--broker-url",
            "wss://b.example/ws",
        ]))
        .unwrap();
        assert_eq!(a.max_uses, 5);
        assert_eq!(a.expires, Duration::from_secs(12 * 3600));
        assert_eq!(a.role, Role::Admin);
        assert_eq!(a.broker_url.as_deref(), Some("wss://b.example/ws"));
        let a = parse_invite(&args(&["--mesh=m1", "--owner-key=/k", "--expires=7d"])).unwrap();
        assert_eq!(a.expires, DEFAULT_EXPIRES);
        for bad in [
            &["--owner-key", "/k"][..],
            &["--mesh", "m1"],
            &["--mesh", "m1", "--owner-key", "/k", "--max-uses", "0"],
            &["--mesh", "m1", "--owner-key", "/k", "--max-uses", "x"],
            &["--mesh", "m1", "--owner-key", "/k", "--expires", "soon"],
            &["--mesh", "m1", "--owner-key", "/k", "--role", "owner"],
            &["--mesh", "m1", "--owner-key", "/k", "--broker-url", "a|b"],
            &["--mesh", "m1", "--owner-key", "/k", "--bogus", "1"],
        ] {
            assert!(parse_invite(&args(bad)).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn slugs() {
        assert_eq!(slugify("Backend  Team 2"), "backend-team-2");
        assert_eq!(slugify("--a--"), "a");
        assert_eq!(slugify("ünïcode"), "n-code");
        assert_eq!(slugify("!!"), "");
    }

    #[test]
    fn key_files_round_trip_and_are_private() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("owner.key");
        assert!(load_owner_key(&path, false).is_err());
        let (key, created) = load_owner_key(&path, true).unwrap();
        assert!(created);
        let mode = std::fs::metadata(&path).unwrap().permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
            0o600
        );
        let (again, created) = load_owner_key(&path, true).unwrap();
        assert!(!created);
        assert_eq!(again.to_bytes(), key.to_bytes());
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.trim().len(), 64);
        std::fs::write(&path, "not a key\n").unwrap();
        assert!(load_owner_key(&path, true).is_err());
        assert!(parse_key_file(&format!("  {}\n", "0a".repeat(32))).is_some());
        assert!(parse_key_file(&"0a".repeat(31)).is_none());
    }
}
