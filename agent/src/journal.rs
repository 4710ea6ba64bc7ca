//! The operation journal: each backend's phase and the operation acting on it, written to disk
//! (atomically, synced) before every step that acts on a load balancer, the kernel or the
//! service. After a crash the next agent reads it back and reconciles (reconcile.rs), so a
//! server is never left out of rotation without anyone saying so.
//!
//! One small JSON document, replaced whole: written to a temporary file, synced, renamed over
//! the journal, and the directory synced — a reader sees the old record or the new one, never
//! a torn one. A torn or unreadable file (a disk error, a hand edit) is reported and set
//! aside, and reconciliation falls back to the load balancers' real state.

use std::{
    collections::BTreeMap,
    fs::File,
    io::Write as _,
    path::{Path, PathBuf},
    time::{SystemTime, UNIX_EPOCH},
};

use serde::{Deserialize, Serialize};

use crate::drain::Phase;

/// The journal's file name inside `state_dir`.
const FILE_NAME: &str = "journal.json";
/// The record's format version.
const VERSION: u32 = 1;

/// Why the journal could not be read or written; names the file.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("cannot write the operation journal {path}: {source} (state_dir)")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read the operation journal {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the operation journal {path} is unreadable ({reason}); it was kept as {kept} and the \
         agent reconciles from the load balancers' real state"
    )]
    Torn {
        path: PathBuf,
        reason: String,
        kept: PathBuf,
    },
}

/// What the journal says about one backend.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct BackendRecord {
    pub phase: Phase,
    /// The operation acting on the backend ("drain", "cycle", "resume", "reconcile"), while
    /// one runs; `None` at rest.
    pub operation: Option<String>,
    /// Why the backend is in its phase (failures).
    pub reason: Option<String>,
    /// The process group of the restart or rollback command under way, so that an agent
    /// started after a crash waits for it to finish before it verifies the service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step_process_group: Option<i32>,
    /// Until when (ms since the Unix epoch) the backend's kernel gate is closed, while it is:
    /// the gate goes with the agent's process, and an agent started again closes it again
    /// for what is left if the backend is still drained.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gate_closed_until_unix_ms: Option<u64>,
    /// The same-host handover under way: an agent started after a crash finishes it (the
    /// new version took over) or undoes it (it had not).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub handover: Option<HandoverRecord>,
    /// The agent put the server back in service and not every agent-check poller has been
    /// told `ready` twice since: a restarted agent owes each of them `ready` again (it told
    /// them `maint` or `drain`; nobody else will undo that).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub ready_owed: bool,
    /// When the backend entered its phase (ms since the Unix epoch): status and the start's
    /// log say since when, not since the agent started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since_unix_ms: Option<u64>,
    /// The operation that moved the backend into its phase ("drain", "cycle", ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub by: Option<String>,
    /// Milliseconds since the Unix epoch of the last change.
    pub updated_unix_ms: u64,
}

/// Where a handover was, and the two versions' processes.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct HandoverRecord {
    /// `false` while the new version is started and verified (nothing but the agent's
    /// probes reach it); `true` once new connections go to it.
    pub switched: bool,
    /// The processes holding the old version's listeners.
    pub old_pids: Vec<i32>,
    /// The new version's, once it listens.
    #[serde(default)]
    pub new_pids: Vec<i32>,
    /// With `units`: the old version's unit and the new one's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub units: Option<(String, String)>,
    /// Each old pid's start time (clock ticks since boot, /proc/PID/stat): a pid from the
    /// journal is that process only if it still started then, on the same boot.
    #[serde(default)]
    pub old_starts: Vec<u64>,
    /// The same for `new_pids`.
    #[serde(default)]
    pub new_starts: Vec<u64>,
    /// The old version's listening sockets (inodes), written before `start` runs: whatever
    /// else listens on the backend's ports after a crash is the new version, found or not.
    #[serde(default)]
    pub old_listeners: Vec<u64>,
    /// The boot the pids belong to (/proc/sys/kernel/random/boot_id).
    #[serde(default)]
    pub boot_id: String,
}

/// The whole journal.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Record {
    pub version: u32,
    /// By backend name.
    pub backends: BTreeMap<String, BackendRecord>,
}

impl Default for Record {
    fn default() -> Record {
        Record {
            version: VERSION,
            backends: BTreeMap::new(),
        }
    }
}

/// What reading the journal at start found.
#[derive(Debug)]
pub enum Found {
    /// No journal: a first start, or a state_dir that was wiped.
    Nothing,
    /// The record the previous agent left.
    Record(Record),
    /// A file that could not be parsed (set aside); reconcile from the load balancers.
    Torn(JournalError),
}

/// The journal file in `state_dir`.
#[derive(Debug, Clone)]
pub struct Journal {
    path: PathBuf,
}

impl Journal {
    /// The journal in `state_dir` (created with mode 0700 if missing).
    pub fn open(state_dir: &Path) -> Result<Journal, JournalError> {
        let path = state_dir.join(FILE_NAME);
        std::fs::create_dir_all(state_dir).map_err(|source| JournalError::Write {
            path: path.clone(),
            source,
        })?;
        Ok(Journal { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads what the previous agent left.
    pub fn read(&self) -> Result<Found, JournalError> {
        let bytes = match std::fs::read(&self.path) {
            Ok(bytes) => bytes,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(Found::Nothing),
            Err(source) => {
                return Err(JournalError::Read {
                    path: self.path.clone(),
                    source,
                });
            }
        };
        match serde_json::from_slice::<Record>(&bytes) {
            Ok(record) if record.version == VERSION => Ok(Found::Record(record)),
            parsed => {
                let reason = match parsed {
                    Ok(record) => format!("format version {} is not {VERSION}", record.version),
                    Err(err) => err.to_string(),
                };
                let kept = self.path.with_extension(format!("torn-{}", unix_ms()));
                std::fs::rename(&self.path, &kept).map_err(|source| JournalError::Write {
                    path: kept.clone(),
                    source,
                })?;
                Ok(Found::Torn(JournalError::Torn {
                    path: self.path.clone(),
                    reason,
                    kept,
                }))
            }
        }
    }

    /// Replaces the journal with `record`: temporary file, fsync, rename, fsync of the
    /// directory.
    pub fn write(&self, record: &Record) -> Result<(), JournalError> {
        let error = |source| JournalError::Write {
            path: self.path.clone(),
            source,
        };
        let temporary = self.path.with_extension("json.new");
        let bytes = serde_json::to_vec_pretty(record).expect("the journal serializes");
        let mut file = File::create(&temporary).map_err(error)?;
        file.write_all(&bytes).map_err(error)?;
        file.sync_all().map_err(error)?;
        drop(file);
        std::fs::rename(&temporary, &self.path).map_err(error)?;
        if let Some(dir) = self.path.parent() {
            File::open(dir)
                .and_then(|dir| dir.sync_all())
                .map_err(error)?;
        }
        Ok(())
    }
}

/// Milliseconds since the Unix epoch.
pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("journal-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn a_record_survives_a_write_and_a_read() {
        let dir = temp_dir("roundtrip");
        let journal = Journal::open(&dir).unwrap();
        assert!(matches!(journal.read().unwrap(), Found::Nothing));
        let mut record = Record::default();
        record.backends.insert(
            "nova-api".into(),
            BackendRecord {
                phase: Phase::Restarting,
                operation: Some("cycle".into()),
                reason: None,
                step_process_group: Some(4242),
                gate_closed_until_unix_ms: Some(2),
                handover: Some(HandoverRecord {
                    switched: true,
                    old_pids: vec![10, 11],
                    new_pids: vec![12],
                    units: None,
                    old_starts: vec![100, 101],
                    new_starts: vec![102],
                    old_listeners: vec![7],
                    boot_id: "b".into(),
                }),
                ready_owed: true,
                since_unix_ms: Some(1),
                by: Some("cycle".into()),
                updated_unix_ms: 1,
            },
        );
        journal.write(&record).unwrap();
        let Found::Record(read) = journal.read().unwrap() else {
            panic!("no record");
        };
        assert_eq!(read, record);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_torn_journal_is_set_aside_and_reported() {
        let dir = temp_dir("torn");
        let journal = Journal::open(&dir).unwrap();
        std::fs::write(journal.path(), b"{\"version\": 1, \"backends\": {\"nova-a").unwrap();
        let Found::Torn(err) = journal.read().unwrap() else {
            panic!("a torn file was accepted");
        };
        let message = err.to_string();
        assert!(message.contains("unreadable"), "{message}");
        assert!(!journal.path().exists(), "the torn file must be set aside");
        assert!(matches!(journal.read().unwrap(), Found::Nothing));
        std::fs::remove_dir_all(dir).unwrap();
    }
}
