//! Durability: where durable definitions and persistent messages live on disk.
//!
//! Layout under the data directory:
//! - `definitions.json`: durable exchanges, queues (with their arguments) and bindings, rewritten
//!   atomically (temp file, fsync, rename) on every change;
//! - `queues/<id>/<segment>.seg`: each durable queue's log of message, ack and purge records.
//!
//! Persistent messages routed to durable queues are appended under the queue's lock and
//! confirmed only after the `Syncer` thread's next fsync (group commit). Transient messages are
//! logged only when a queue pages them out, and never cost an fsync.

mod log;
mod rangeset;
mod record;
mod syncer;

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use amq_protocol::types::FieldTable;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

pub use log::{LoggedMessage, Position, QueueLog, Recovered};
pub use record::StoredMessage;
pub use syncer::Syncer;

/// Held by every durable write a publish made; released (dropped) once the write is on disk.
/// The gateway's confirm fires when the last holder lets go.
pub trait Completion: Send + Sync {
    /// The write could not be made durable; the publisher must get basic.nack.
    fn failed(&self, reason: &str);
}

pub type Guard = Arc<dyn Completion>;

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Definitions {
    pub exchanges: Vec<ExchangeDef>,
    pub queues: Vec<QueueDef>,
    pub bindings: Vec<BindingDef>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ExchangeDef {
    pub name: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub auto_delete: bool,
    pub internal: bool,
    pub arguments: FieldTable,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct QueueDef {
    pub name: String,
    /// Directory of the queue's log under `queues/`.
    pub id: u64,
    pub auto_delete: bool,
    pub arguments: FieldTable,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct BindingDef {
    pub source: String,
    pub destination: String,
    pub destination_is_queue: bool,
    pub routing_key: String,
    pub arguments: FieldTable,
}

/// Tunables of the store.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// A segment file is closed and a new one started past this size.
    pub segment_bytes: u64,
    /// Ready messages a durable queue keeps in memory before paging further ones to disk.
    pub queue_memory_messages: usize,
    /// Body bytes a durable queue keeps in memory before paging.
    pub queue_memory_bytes: usize,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            segment_bytes: 64 * 1024 * 1024,
            queue_memory_messages: 100_000,
            queue_memory_bytes: 64 * 1024 * 1024,
        }
    }
}

pub struct Store {
    root: PathBuf,
    pub options: StoreOptions,
    syncer: Arc<Syncer>,
    definitions: Mutex<()>,
    /// Held open for the process's life: a second Warren on the same directory is refused.
    _lock: File,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("root", &self.root).finish()
    }
}

/// Makes a directory entry change (new or renamed file) durable.
pub(crate) fn sync_dir(dir: &Path) {
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}

impl Store {
    pub fn open(root: impl Into<PathBuf>, options: StoreOptions) -> io::Result<Arc<Store>> {
        let root = root.into();
        fs::create_dir_all(root.join("queues"))?;
        let lock = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(root.join("warren.lock"))?;
        lock.try_lock().map_err(|_| {
            io::Error::new(
                io::ErrorKind::WouldBlock,
                format!("{} is in use by another Warren process", root.display()),
            )
        })?;
        Ok(Arc::new(Store {
            root,
            options,
            syncer: Syncer::start(),
            definitions: Mutex::new(()),
            _lock: lock,
        }))
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn load_definitions(&self) -> io::Result<Definitions> {
        let path = self.root.join("definitions.json");
        match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{}: {e}", path.display()),
                )
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Definitions::default()),
            Err(e) => Err(e),
        }
    }

    /// Replaces the definitions file atomically: a crash leaves the old or the new one.
    pub fn save_definitions(&self, defs: &Definitions) -> io::Result<()> {
        let _guard = self.definitions.lock();
        let tmp = self.root.join("definitions.json.tmp");
        let bytes = serde_json::to_vec_pretty(defs).map_err(io::Error::other)?;
        let mut f = File::create(&tmp)?;
        f.write_all(&bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, self.root.join("definitions.json"))?;
        sync_dir(&self.root);
        Ok(())
    }

    /// Opens a durable queue's log, recovering what it holds.
    pub fn open_queue_log(&self, id: u64) -> io::Result<(Arc<QueueLog>, Recovered)> {
        QueueLog::open(
            self.root.join("queues").join(id.to_string()),
            self.options.segment_bytes,
            self.syncer.clone(),
            self.options.queue_memory_messages,
        )
    }

    /// Completes outstanding fsyncs; called on shutdown.
    pub fn close(&self) {
        self.syncer.stop();
    }
}
