//! A private PostgreSQL cluster, started from the server binaries on this machine, for the
//! local runner (when `DATABASE_URL` is unset) and for tests that must stop their database.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

#[derive(Debug, thiserror::Error)]
pub enum DevDbError {
    #[error(
        "no PostgreSQL server binaries found (looked in $PG_BINDIR, `pg_config --bindir` and \
         /usr/lib/postgresql/*/bin): install them (Debian: apt-get install postgresql) or set DATABASE_URL"
    )]
    NoServerBinaries,
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("`{command}` failed: {output}")]
    Command { command: String, output: String },
}

/// A cluster in `datadir`, listening on 127.0.0.1:`port` only (no Unix socket, so two
/// clusters never collide on a socket path).
#[derive(Debug)]
pub struct PrivatePostgres {
    bindir: PathBuf,
    datadir: PathBuf,
    port: u16,
    options: String,
    /// Postgres refuses to run as root; when we are root, its commands run as this user.
    run_as: Option<(u32, u32)>,
}

impl PrivatePostgres {
    /// Prepares (initdb if needed) but does not start a cluster. `extra_options` are passed to
    /// the server, e.g. `-c fsync=off` for throwaway test clusters.
    pub fn new(datadir: &Path, port: u16, extra_options: &str) -> Result<Self, DevDbError> {
        // Its owner is changed to `postgres` below: a symlink there (planted in a shared
        // directory like /tmp) would hand someone else's directory over.
        refuse_symlinks(datadir)?;
        let bindir = tally_shared::pg::find_bindir().ok_or(DevDbError::NoServerBinaries)?;
        std::fs::create_dir_all(datadir)?;
        let datadir = datadir.canonicalize()?;
        let run_as = if is_root() {
            Some(postgres_user()?)
        } else {
            None
        };
        if run_as.is_some() && !others_can_reach(&datadir) {
            return Err(DevDbError::Io(std::io::Error::other(format!(
                "PostgreSQL runs as the postgres user, which cannot reach {}: set TALLY_DATA_DIR \
                 to a directory it can (e.g. /var/tmp/tally), or set DATABASE_URL",
                datadir.display()
            ))));
        }
        if let Some((uid, gid)) = run_as {
            std::os::unix::fs::chown(&datadir, Some(uid), Some(gid))?;
            std::fs::set_permissions(
                &datadir,
                std::os::unix::fs::PermissionsExt::from_mode(0o700),
            )?;
        }
        let cluster = Self {
            bindir,
            datadir,
            port,
            options: format!(
                "-p {port} -c listen_addresses=127.0.0.1 -c unix_socket_directories='' {extra_options}"
            ),
            run_as,
        };
        if !cluster.datadir.join("PG_VERSION").exists() {
            cluster.run(
                "initdb",
                &[
                    "-D".as_ref(),
                    cluster.datadir.as_os_str(),
                    "-U".as_ref(),
                    "postgres".as_ref(),
                    "-A".as_ref(),
                    "trust".as_ref(),
                    "-E".as_ref(),
                    "UTF8".as_ref(),
                    "--no-sync".as_ref(),
                    "--no-instructions".as_ref(),
                ],
            )?;
        }
        Ok(cluster)
    }

    /// Starts the server and waits until it accepts connections. A cluster already running in
    /// this data directory is reused.
    pub fn start(&self) -> Result<(), DevDbError> {
        if self.is_running() {
            return Ok(());
        }
        let log = self.datadir.join("server.log");
        self.run(
            "pg_ctl",
            &[
                "-D".as_ref(),
                self.datadir.as_os_str(),
                "-l".as_ref(),
                log.as_os_str(),
                "-o".as_ref(),
                self.options.as_ref(),
                "-w".as_ref(),
                "-t".as_ref(),
                "60".as_ref(),
                "start".as_ref(),
            ],
        )
        .map(|_| ())
    }

    /// Stops the server (fast mode: running transactions are rolled back, clients cut off).
    pub fn stop(&self) -> Result<(), DevDbError> {
        if !self.is_running() {
            return Ok(());
        }
        self.run(
            "pg_ctl",
            &[
                "-D".as_ref(),
                self.datadir.as_os_str(),
                "-m".as_ref(),
                "fast".as_ref(),
                "-w".as_ref(),
                "stop".as_ref(),
            ],
        )
        .map(|_| ())
    }

    pub fn is_running(&self) -> bool {
        self.command("pg_ctl")
            .arg("-D")
            .arg(&self.datadir)
            .arg("status")
            .output()
            .is_ok_and(|o| o.status.success())
    }

    /// A URL for `database` on this cluster.
    pub fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    fn command(&self, program: &str) -> Command {
        let mut command = Command::new(self.bindir.join(program));
        if let Some((uid, gid)) = self.run_as {
            std::os::unix::process::CommandExt::uid(&mut command, uid);
            std::os::unix::process::CommandExt::gid(&mut command, gid);
            // The working directory must be readable by that user.
            command.current_dir("/");
        }
        command
    }

    fn run(&self, program: &str, args: &[&std::ffi::OsStr]) -> Result<Output, DevDbError> {
        let output = self.command(program).args(args).output()?;
        if output.status.success() {
            Ok(output)
        } else {
            Err(DevDbError::Command {
                command: format!(
                    "{program} {}",
                    args.iter()
                        .map(|a| a.to_string_lossy())
                        .collect::<Vec<_>>()
                        .join(" ")
                ),
                output: String::from_utf8_lossy(&[output.stdout, output.stderr].concat())
                    .trim()
                    .to_owned(),
            })
        }
    }
}

/// Fails when `path`, or a directory on the way to it, is a symbolic link.
fn refuse_symlinks(path: &Path) -> Result<(), DevDbError> {
    let absolute = std::path::absolute(path)?;
    for part in absolute.ancestors() {
        if std::fs::symlink_metadata(part).is_ok_and(|m| m.file_type().is_symlink()) {
            return Err(DevDbError::Io(std::io::Error::other(format!(
                "{} is a symbolic link: a cluster's data directory must be a real directory \
                 (resolve it and pass the real path)",
                part.display()
            ))));
        }
    }
    Ok(())
}

/// Whether every directory above `path` lets other users through (o+x).
fn others_can_reach(path: &Path) -> bool {
    path.ancestors().skip(1).all(|dir| {
        std::fs::metadata(dir)
            .is_ok_and(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o001 != 0)
    })
}

fn is_root() -> bool {
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

/// uid and gid of the `postgres` account, which Debian's server package creates.
fn postgres_user() -> Result<(u32, u32), DevDbError> {
    let passwd = std::fs::read_to_string("/etc/passwd")?;
    passwd
        .lines()
        .find_map(|line| {
            let fields: Vec<&str> = line.split(':').collect();
            (fields.first() == Some(&"postgres") && fields.len() > 3)
                .then(|| Some((fields[2].parse().ok()?, fields[3].parse().ok()?)))
                .flatten()
        })
        .ok_or_else(|| {
            DevDbError::Io(std::io::Error::other(
                "running as root, and there is no `postgres` user to run PostgreSQL as",
            ))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_symlinked_data_directory_is_refused() {
        let base = std::env::temp_dir().join(format!(
            "tally-devdb-symlink-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        std::fs::create_dir(&base).unwrap();
        let target = base.join("someone-elses");
        std::fs::create_dir(&target).unwrap();
        let planted = base.join("pgdata");
        std::os::unix::fs::symlink(&target, &planted).unwrap();
        let refused = PrivatePostgres::new(&planted, 1, "");
        let below = PrivatePostgres::new(&planted.join("inner"), 1, "");
        std::fs::remove_dir_all(&base).unwrap();
        assert!(
            matches!(&refused, Err(DevDbError::Io(e)) if e.to_string().contains("symbolic link")),
            "{refused:?}"
        );
        assert!(matches!(below, Err(DevDbError::Io(_))), "{below:?}");
    }
}
