//! `vault` and `vault key` subcommands, and the S3 location arguments.

use std::path::PathBuf;

use clap::Subcommand;

#[derive(Subcommand)]
pub enum VaultCmd {
    /// Create a vault.
    Create {
        /// Vault name (letters, digits, '-', '_', '.').
        name: String,
        /// Where (default <data>/vaults/NAME).
        #[arg(long)]
        path: Option<PathBuf>,
        /// Chunk size, fixed for the vault's life: a power of two from 16K to 4M.
        #[arg(long, default_value = "64K")]
        chunk_size: String,
        /// zstd compression level of new chunks.
        #[arg(long, default_value_t = 1)]
        zstd_level: i32,
        /// Compliance mode: lock every backup for at least N days after its creation
        /// (fixed for the vault's life; nothing deletes a backup before then).
        #[arg(long, value_name = "N")]
        compliance_days: Option<u32>,
        /// Encrypt the vault (AES-256-GCM, keyed digests) under a new random key, wrapped
        /// by --keyfile PATH or --passphrase-env VAR.
        #[arg(long)]
        encrypt: bool,
        /// Create the vault as a replication target of vault SOURCE: its chunk size and
        /// zstd level and, when SOURCE is encrypted, its vault key (opened with --keyfile
        /// / --passphrase-env, which then also wrap the new vault's copy of the key).
        #[arg(long, value_name = "SOURCE", conflicts_with_all = ["encrypt", "chunk_size", "zstd_level", "compliance_days"])]
        replica_of: Option<String>,
        #[command(flatten)]
        s3: S3Args,
    },
    /// Keys of an encrypted vault: the wrappings of its key (a key file, a passphrase).
    #[command(subcommand)]
    Key(KeyCmd),
    /// List vaults.
    List,
    /// Usage of a vault.
    Info {
        /// Vault name.
        name: String,
    },
    /// Rebuild the catalog and the lookup index from the vault's own files.
    Rescan {
        /// Vault name.
        name: String,
    },
    /// Register an existing vault directory under NAME and read its backups.
    Attach {
        /// Name to register the vault under.
        name: String,
        /// The vault's directory (holds vault.toml); not with --s3.
        #[arg(required_unless_present = "s3")]
        path: Option<PathBuf>,
        #[command(flatten)]
        s3: S3Args,
    },
}

/// A vault on S3-compatible object storage. Credentials are never arguments: they come
/// from the config file's [s3.NAME] (--s3-config NAME: the vault remembers the name and
/// reads its credential files at each use), or from AWS_ACCESS_KEY_ID and
/// AWS_SECRET_ACCESS_KEY (kept, mode 0600, in the vault's state directory
/// <data>/vaults/NAME/s3-credentials.toml).
#[derive(clap::Args, Debug, Clone, Default)]
pub struct S3Args {
    /// The vault in a bucket: s3://BUCKET/PREFIX (local state stays in <data>/vaults/NAME).
    #[arg(
        long = "s3",
        value_name = "s3://BUCKET/PREFIX",
        conflicts_with = "path"
    )]
    pub s3: Option<String>,
    /// URL of the S3 API (e.g. http://127.0.0.1:3900).
    #[arg(long, value_name = "URL", requires = "s3")]
    pub endpoint: Option<String>,
    /// Region (default us-east-1; Garage's default is "garage").
    #[arg(long, requires = "s3")]
    pub region: Option<String>,
    /// Endpoint, region and credentials from the config file's [s3.NAME].
    #[arg(long, value_name = "NAME", requires = "s3", conflicts_with_all = ["endpoint", "region"])]
    pub s3_config: Option<String>,
    /// The config file with the [s3.NAME] tables (with --s3-config).
    #[arg(
        long = "config",
        env = "BLOCKVAULT_CONFIG",
        value_name = "PATH",
        default_value = "/etc/blockvault/blockvault.toml"
    )]
    pub config: PathBuf,
}

impl S3Args {
    /// The `[s3.NAME]` that --s3-config names (its config file made absolute).
    pub fn profile(&self) -> Option<blockvault::vault::remote::S3Profile> {
        self.s3_config
            .as_ref()
            .map(|name| blockvault::vault::remote::S3Profile {
                name: name.clone(),
                config: std::path::absolute(&self.config).unwrap_or_else(|_| self.config.clone()),
            })
    }

    /// The location given, if any.
    pub fn location(&self) -> blockvault::Result<Option<blockvault::vault::store::S3Location>> {
        let Some(url) = &self.s3 else {
            return Ok(None);
        };
        if let Some(p) = self.profile() {
            let t = p.table()?;
            // Refused now, clearly, rather than at the first request.
            p.credentials()?;
            return Ok(Some(blockvault::vault::store::S3Location::parse(
                url,
                &t.endpoint,
                t.region.as_deref(),
            )?));
        }
        let Some(endpoint) = &self.endpoint else {
            return Err(blockvault::Error::config(
                "--s3 needs --endpoint URL (and --region), or --s3-config NAME for a [s3.NAME] of the config file",
            ));
        };
        Ok(Some(blockvault::vault::store::S3Location::parse(
            url,
            endpoint,
            self.region.as_deref(),
        )?))
    }
}

#[derive(Subcommand)]
pub enum KeyCmd {
    /// Wrap the vault key with one more key file or passphrase (the vault is opened
    /// with --keyfile / --passphrase-env first).
    Add {
        /// Vault name.
        name: String,
        /// The new key file (written new, 0600, if PATH does not exist).
        #[arg(
            long,
            value_name = "PATH",
            required_unless_present = "new_passphrase_env"
        )]
        new_keyfile: Option<PathBuf>,
        /// Environment variable holding the new passphrase.
        #[arg(long, value_name = "VAR", conflicts_with = "new_keyfile")]
        new_passphrase_env: Option<String>,
        /// A note shown by `vault key list`.
        #[arg(long)]
        label: Option<String>,
    },
    /// List the wrappings of the vault key (no key needed).
    List {
        /// Vault name.
        name: String,
    },
    /// Remove a wrapping (never the last one).
    Remove {
        /// Vault name.
        name: String,
        /// Wrapping id (`vault key list`).
        id: String,
    },
    /// Print the vault key as a paper recovery key (keep it offline; it opens the vault
    /// as --keyfile when saved to a file).
    Export {
        /// Vault name.
        name: String,
        /// Printable form: four numbered lines of hex groups, each with a check.
        #[arg(long, required = true)]
        paper: bool,
    },
    /// Keep a key file of the vault in this appliance's key store
    /// (<data>/keys/<vault id>.key, root-only) so scheduled backups run unattended.
    Store {
        /// Vault name.
        name: String,
    },
}
