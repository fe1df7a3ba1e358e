//! The files that hold secrets (private keys, nkey seeds, creds, the JWT secret) and whether
//! every local user may read them: the gateway checks their modes at start and says which are
//! open, because a key any user can read is a key any user can use.

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;

use super::Config;
use super::nats_auth::written_as;

/// One secret file every user of the host may read or write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenSecretFile {
    /// The setting as it was given (`--tls-key`, `IPC_GATEWAY_NATS_CREDS`, ...).
    pub setting: String,
    pub path: PathBuf,
    /// The file's permission bits (`0o644`).
    pub mode: u32,
}

impl Config {
    /// The secret files whose mode lets every user read or write them (the "other" bits). A
    /// file that cannot be looked at is left out: loading it reports that.
    pub fn secret_files_open_to_others(&self) -> Vec<OpenSecretFile> {
        [
            ("tls_key", &self.tls_key),
            ("grpc_tls_key", &self.grpc_tls_key),
            ("nats_creds", &self.nats_creds),
            ("nats_nkey", &self.nats_nkey),
            ("nats_tls_key", &self.nats_tls_key),
            ("auth_jwt_secret_file", &self.auth_jwt_secret_file),
        ]
        .into_iter()
        .filter_map(|(key, path)| {
            let path = path.as_ref()?;
            let mode = std::fs::metadata(path).ok()?.permissions().mode() & 0o7777;
            (mode & 0o007 != 0).then(|| OpenSecretFile {
                setting: written_as(key),
                path: path.clone(),
                mode,
            })
        })
        .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_every_user_can_read_is_named_and_a_private_one_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let open = dir.path().join("open.key");
        let private = dir.path().join("private.key");
        for (path, mode) in [(&open, 0o644), (&private, 0o600)] {
            std::fs::write(path, "x").unwrap();
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
        }
        let config = Config {
            tls_key: Some(open.clone()),
            nats_nkey: Some(private),
            auth_jwt_secret_file: Some(dir.path().join("missing")),
            ..Config::default()
        };
        assert_eq!(
            config.secret_files_open_to_others(),
            [OpenSecretFile {
                setting: "--tls-key".into(),
                path: open,
                mode: 0o644,
            }]
        );
    }
}
