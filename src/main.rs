//! The `meshbroker` command: CLI and start-up only; the broker lives in the library.
use meshbroker::config::{Config, NodeEnv};
use meshbroker::devdb::{LocalPostgres, DEFAULT_DATABASE};
use meshbroker::{broker, db, enroll, logging};
use std::process::ExitCode;

// Measured (bench/RESULTS.md, issue 14): glibc's malloc/free were a quarter
// of the broker's CPU on direct sends (per-message envelopes, frames and
// audit rows freed on other threads); mimalloc's thread-local free lists
// make that a fraction. Built without transparent huge pages (`no_thp`):
// with them every first touch of an arena zeroed 2 MiB, and held sends
// spent 63 % of the broker's CPU in the kernel's clear_page.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const USAGE: &str = "\
usage: meshbroker [COMMAND]

commands:
  (none)          run the broker (configured by environment variables; see README.md)
  --check-config  validate the configuration, print the effective values, exit
  migrate         run the database migrations and exit
  mesh create --name NAME [--slug S] --owner-key FILE [--owner-user ID]
                  create a mesh owned by an ed25519 key (the file holds the
                  secret key as 64 hex digits; created, mode 0600, if missing)
  invite --mesh ID --owner-key FILE [--max-uses N] [--expires 7d]
         [--role member|admin] [--broker-url URL]
                  store a signed invite and print its payload, token and link
                  (for POST /join); both commands migrate DATABASE_URL first
  healthcheck     GET /health/live on the local broker (liveness: up whatever
                  Postgres does); exit 0 when it answers 200
  healthcheck --ready
                  GET /health instead (readiness: 503 while Postgres is away)
  audit verify --mesh ID
                  check the mesh's audit chain (PROTOCOL.md §13) and print one
                  JSON line; exit 0 valid, 1 broken (brokenAt names the first
                  broken row), 2 not checked (bad arguments, database error)
  --version       print the version
  --help          print this help";

fn main() -> ExitCode {
    let command = std::env::args().nth(1);
    match command.as_deref() {
        Some("--help" | "-h" | "help") => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Some("--version" | "-V") => {
            println!("meshbroker {}", env!("CARGO_PKG_VERSION"));
            return ExitCode::SUCCESS;
        }
        None | Some("--check-config" | "migrate" | "healthcheck") => {}
        Some("audit") => return audit(std::env::args().skip(2).collect()),
        Some("mesh" | "invite") => {}
        Some(other) => {
            eprintln!("meshbroker: unknown command {other:?}\n{USAGE}");
            return ExitCode::from(2);
        }
    }
    // The onboarding commands' arguments are checked before anything else.
    let args: Vec<String> = std::env::args().skip(2).collect();
    let onboarding = match command.as_deref() {
        Some("mesh") => match args.split_first() {
            Some((sub, rest)) if sub == "create" => match enroll::parse_mesh_create(rest) {
                Ok(a) => Some(Onboarding::MeshCreate(a)),
                Err(e) => return usage_error(&e, enroll::MESH_CREATE_USAGE),
            },
            _ => {
                eprintln!(
                    "meshbroker: mesh takes a subcommand: create\n{}",
                    enroll::MESH_CREATE_USAGE
                );
                return ExitCode::from(2);
            }
        },
        Some("invite") => match enroll::parse_invite(&args) {
            Ok(a) => Some(Onboarding::Invite(a)),
            Err(e) => return usage_error(&e, enroll::INVITE_USAGE),
        },
        _ => None,
    };
    let config = match Config::from_env() {
        Ok(config) => config,
        Err(errors) => {
            eprint!("{errors}");
            if !errors.to_string().ends_with('\n') {
                eprintln!();
            }
            return ExitCode::from(1);
        }
    };
    let result = match command.as_deref() {
        Some("--check-config") => {
            for (name, value) in config.effective() {
                println!("{name}={value}");
            }
            Ok(())
        }
        Some("healthcheck") => {
            let ready = std::env::args().nth(2).as_deref() == Some("--ready");
            healthcheck(&config, if ready { "/health" } else { "/health/live" })
        }
        Some("mesh" | "invite") => {
            logging::init();
            let onboarding = onboarding.expect("parsed above");
            let default_broker_url = format!("ws://localhost:{}/ws", config.port);
            with_database(&config, |url| {
                db::migrate_blocking(url)?;
                let out = match &onboarding {
                    Onboarding::MeshCreate(a) => enroll::mesh_create(a, url)?,
                    Onboarding::Invite(a) => enroll::invite(a, url, &default_broker_url)?,
                };
                print!("{out}");
                Ok(())
            })
        }
        Some("migrate") => {
            logging::init();
            with_database(&config, |url| {
                let applied = db::migrate_blocking(url)?;
                tracing::info!(target: "db", applied, "db migrated");
                Ok(())
            })
        }
        _ => {
            logging::init();
            with_database(&config, |url| broker::run(config.clone(), url.to_owned()))
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(target: "broker", error = %format!("{e:#}"), "fatal");
            eprintln!("meshbroker: {e:#}");
            ExitCode::from(1)
        }
    }
}

enum Onboarding {
    MeshCreate(enroll::MeshCreateArgs),
    Invite(enroll::InviteArgs),
}

fn usage_error(e: &enroll::UsageError, usage: &str) -> ExitCode {
    eprintln!("meshbroker: {e}\n{usage}");
    ExitCode::from(2)
}

/// Runs `f` with the configured database, or with the embedded development
/// Postgres (started here, stopped when `f` returns) when DATABASE_URL is unset.
fn with_database(
    config: &Config,
    f: impl FnOnce(&str) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    if let Some(url) = &config.database_url {
        tracing::info!(target: "db", mode = "external", url = %meshbroker::config::redact_url(url), "database");
        return f(url);
    }
    // Config validation already refused production without DATABASE_URL.
    debug_assert_ne!(config.node_env, NodeEnv::Production);
    let pg = LocalPostgres::start(&config.data_dir, false)?;
    let url = pg.url(DEFAULT_DATABASE);
    tracing::info!(target: "db", mode = "embedded", data_dir = %pg.data_dir().display(), port = pg.port(), url = %url, "database");
    let result = f(&url);
    drop(pg);
    tracing::info!(target: "db", "embedded postgres stopped");
    result
}

/// For the Docker HEALTHCHECK and other probes: no curl in the runtime image.
fn healthcheck(config: &Config, path: &str) -> anyhow::Result<()> {
    use std::io::{Read, Write};
    let host = if config.host.is_unspecified() {
        std::net::IpAddr::from([127, 0, 0, 1])
    } else {
        config.host
    };
    let addr = std::net::SocketAddr::new(host, config.port);
    let timeout = std::time::Duration::from_secs(3);
    let mut stream = std::net::TcpStream::connect_timeout(&addr, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes())?;
    let mut reply = String::new();
    stream.read_to_string(&mut reply)?;
    let status = reply.lines().next().unwrap_or_default();
    if status.starts_with("HTTP/1.1 200") {
        println!("{status}");
        Ok(())
    } else {
        anyhow::bail!("unhealthy: {status}")
    }
}

/// `meshbroker audit verify --mesh ID`.
fn audit(args: Vec<String>) -> ExitCode {
    let mesh = match args.iter().map(String::as_str).collect::<Vec<_>>()[..] {
        ["verify", "--mesh", mesh] => mesh.to_owned(),
        ["verify", flag] if flag.starts_with("--mesh=") => flag["--mesh=".len()..].to_owned(),
        _ => {
            eprintln!("meshbroker: usage: meshbroker audit verify --mesh ID\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    if mesh.is_empty() {
        eprintln!("meshbroker: audit verify: --mesh needs a mesh id");
        return ExitCode::from(2);
    }
    let config = match Config::from_env() {
        Ok(config) => config,
        Err(errors) => {
            eprint!("{errors}");
            return ExitCode::from(2);
        }
    };
    logging::init();
    let mut report = None;
    let checked = with_database(&config, |url| {
        report = Some(db::verify_chain_blocking(url, &mesh)?);
        Ok(())
    });
    let report = match (checked, report) {
        (Ok(()), Some(report)) => report,
        (Err(e), _) => {
            eprintln!("meshbroker: audit verify: {e:#}");
            return ExitCode::from(2);
        }
        (Ok(()), None) => return ExitCode::from(2),
    };
    let mut line = serde_json::json!({ "mesh": mesh });
    if let (Some(line), serde_json::Value::Object(fields)) = (
        line.as_object_mut(),
        serde_json::to_value(&report).unwrap_or_default(),
    ) {
        line.extend(fields);
    }
    println!("{line}");
    if report.valid {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}
