//! TLS to PostgreSQL, as libpq's `sslmode` and `sslrootcert` mean it: against a private cluster
//! started with `ssl=on`, a certificate made here (rcgen) by a CA made here, and a pg_hba.conf
//! that admits TLS connections only.

use std::path::PathBuf;

use tally_dev::devdb::PrivatePostgres;
use tally_shared::pg;

use crate::faults::free_port;
use crate::helpers::{TestApp, fresh_dir};

/// The name in the server's certificate; connections reach it at `hostaddr` 127.0.0.1.
const SERVER_NAME: &str = "db.tally.test";

struct TlsCluster {
    cluster: PrivatePostgres,
    dir: PathBuf,
    port: u16,
    ca: PathBuf,
    other_ca: PathBuf,
}

impl Drop for TlsCluster {
    fn drop(&mut self) {
        let _ = self.cluster.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A CA, and a server certificate it signs for [`SERVER_NAME`] only (not 127.0.0.1, so that
/// verify-full to the address fails on the name while verify-ca passes).
fn certificates() -> (String, String, String, String) {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
    let ca = |name: &str| {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let cert = params.clone().self_signed(&key).unwrap();
        (cert.pem(), Issuer::new(params, key))
    };
    let (ca_pem, issuer) = ca("tally test CA");
    let (other_ca_pem, _) = ca("someone else's CA");
    let key = KeyPair::generate().unwrap();
    let server = CertificateParams::new(vec![SERVER_NAME.to_owned()])
        .unwrap()
        .signed_by(&key, &issuer)
        .unwrap();
    (ca_pem, other_ca_pem, server.pem(), key.serialize_pem())
}

fn start() -> TlsCluster {
    let dir = fresh_dir("pg-tls");
    let data = dir.join("data");
    let port = free_port();
    let cluster = PrivatePostgres::new(
        &data,
        port,
        "-c fsync=off -c ssl=on -c ssl_cert_file=server.crt -c ssl_key_file=server.key",
    )
    .expect("server binaries for the TLS tests");
    let (ca, other_ca, cert, key) = certificates();
    // TLS only: a plain connection finds no line that admits it.
    let files = [
        (
            "pg_hba.conf",
            "hostssl all all 127.0.0.1/32 trust\n".to_owned(),
        ),
        ("server.crt", cert),
        ("server.key", key),
    ];
    let owner = std::os::unix::fs::MetadataExt::uid(&std::fs::metadata(&data).unwrap());
    let group = std::os::unix::fs::MetadataExt::gid(&std::fs::metadata(&data).unwrap());
    for (name, text) in files {
        let path = data.join(name);
        std::fs::write(&path, text).unwrap();
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .unwrap();
        std::os::unix::fs::chown(&path, Some(owner), Some(group)).unwrap();
    }
    std::fs::write(dir.join("ca.pem"), ca).unwrap();
    std::fs::write(dir.join("other-ca.pem"), other_ca).unwrap();
    cluster.start().expect("start the TLS cluster");
    TlsCluster {
        ca: dir.join("ca.pem"),
        other_ca: dir.join("other-ca.pem"),
        cluster,
        dir,
        port,
    }
}

impl TlsCluster {
    /// A URL with `query` appended: by name (at 127.0.0.1) or by address.
    fn url(&self, by_name: bool, query: &str) -> String {
        if by_name {
            format!(
                "postgres://postgres@{SERVER_NAME}:{}/postgres?hostaddr=127.0.0.1&{query}",
                self.port
            )
        } else {
            format!(
                "postgres://postgres@127.0.0.1:{}/postgres?{query}",
                self.port
            )
        }
    }
}

/// Connects and answers whether the session is encrypted, or the error's whole text.
async fn encrypted(url: &str) -> Result<bool, String> {
    let client = pg::connect(url).await.map_err(|e| e.to_string())?;
    let row = client
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .map_err(|e| e.to_string())?;
    Ok(row.get(0))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sslmode_and_sslrootcert_are_honoured_as_libpq_does() {
    let tls = tokio::task::spawn_blocking(start).await.unwrap();
    let (ca, other) = (tls.ca.display(), tls.other_ca.display());

    // Encrypted without checking the certificate: require, and prefer (the default).
    assert_eq!(
        encrypted(&tls.url(false, "sslmode=require")).await,
        Ok(true)
    );
    assert_eq!(
        encrypted(&tls.url(false, "application_name=x")).await,
        Ok(true)
    );
    // verify-full: the right CA and the name in the certificate.
    let full = format!("sslmode=verify-full&sslrootcert={ca}");
    assert_eq!(encrypted(&tls.url(true, &full)).await, Ok(true));
    // ... fails with someone else's CA, saying why.
    let wrong = encrypted(&tls.url(true, &format!("sslmode=verify-full&sslrootcert={other}")))
        .await
        .unwrap_err();
    assert!(
        wrong.contains("certificate") && wrong.contains("UnknownIssuer"),
        "{wrong}"
    );
    // ... and with the right CA but an address the certificate does not name; verify-ca
    // checks the chain only, so it connects there.
    let unnamed = encrypted(&tls.url(false, &full)).await.unwrap_err();
    assert!(unnamed.contains("not valid for name"), "{unnamed}");
    let chain = format!("sslmode=verify-ca&sslrootcert={ca}");
    assert_eq!(encrypted(&tls.url(false, &chain)).await, Ok(true));
    // require with a root given checks the chain, as libpq does.
    let require_wrong = encrypted(&tls.url(false, &format!("sslmode=require&sslrootcert={other}")))
        .await
        .unwrap_err();
    assert!(require_wrong.contains("UnknownIssuer"), "{require_wrong}");
    // disable against a server that admits TLS only: the server's refusal, plainly.
    let plain = encrypted(&tls.url(false, "sslmode=disable"))
        .await
        .unwrap_err();
    assert!(plain.contains("no encryption"), "{plain}");
    // What cannot work is refused before connecting, in words.
    let Err(no_root) = pg::target(&tls.url(true, "sslmode=verify-full")) else {
        panic!("verify-full without a root was accepted");
    };
    assert!(no_root.to_string().contains("sslrootcert"), "{no_root}");
    let Err(bad_mode) = pg::target(&tls.url(true, "sslmode=verify_full")) else {
        panic!("a misspelled sslmode was accepted");
    };
    assert!(bad_mode.to_string().contains("verify-full"), "{bad_mode}");
    let Err(no_file) =
        pg::target(&tls.url(true, "sslmode=verify-full&sslrootcert=/nonexistent/ca.pem"))
    else {
        panic!("a missing root file was accepted");
    };
    assert!(
        no_file.to_string().contains("/nonexistent/ca.pem"),
        "{no_file}"
    );

    // The whole API over verify-full: migrations, the roles, the pool, an order.
    let app = TestApp::spawn_on(&tls.url(true, &full), &[]).await;
    assert_eq!(app.order(1, &[(1, 1)]).await.status, 201);
    assert_eq!(app.get("/products").await.status, 200);
    app.assert_books_balance().await;
    drop(app);
    // pg_dump and pg_restore are given the same URL, which libpq reads itself.
    let bindir = pg::find_bindir().unwrap();
    let dump = std::process::Command::new(bindir.join("pg_dump"))
        .arg(format!("--dbname={}", tls.url(true, &full)))
        .args(["--schema-only", "--table=pg_catalog.pg_class"])
        .output()
        .unwrap();
    assert!(
        dump.status.success(),
        "{}",
        String::from_utf8_lossy(&dump.stderr)
    );
}
