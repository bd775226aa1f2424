//! The controller's state in sled: deployments, devices, the assignments each device
//! was given, and the event log Watch resumes from. Records are the wire messages
//! themselves (prost), so a field added to the protocol needs no migration. Every
//! write is flushed before the caller answers, so an acknowledged apply survives a
//! kill -9.

use std::path::Path;

use modeld_proto::fleet::v1 as fpb;
use prost::Message;

use crate::error::{Error, Result};

/// Events the log keeps for Watch to resume from.
pub const RETAINED_EVENTS: u64 = 10_000;

#[derive(Clone)]
pub struct Store {
    db: sled::Db,
    deployments: sled::Tree,
    devices: sled::Tree,
    assignments: sled::Tree,
    rollouts: sled::Tree,
    events: sled::Tree,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").finish_non_exhaustive()
    }
}

fn decode<M: Message + Default>(tree: &str, key: &[u8], value: &[u8]) -> Result<M> {
    M::decode(value)
        .map_err(|e| Error::Corrupt(format!("{tree}/{}: {e}", String::from_utf8_lossy(key))))
}

fn all<M: Message + Default>(tree: &sled::Tree, name: &str) -> Result<Vec<M>> {
    tree.iter()
        .map(|kv| {
            let (k, v) = kv?;
            decode(name, &k, &v)
        })
        .collect()
}

impl Store {
    pub fn open(dir: &Path) -> Result<Store> {
        std::fs::create_dir_all(dir)
            .map_err(|e| Error::Config(format!("{}: {e}", dir.display())))?;
        let db = sled::Config::new().path(dir).open()?;
        Ok(Store {
            deployments: db.open_tree("deployments")?,
            devices: db.open_tree("devices")?,
            assignments: db.open_tree("assignments")?,
            rollouts: db.open_tree("rollouts")?,
            events: db.open_tree("events")?,
            db,
        })
    }

    /// Writes everything to disk on a blocking thread: sled's `flush_async` futures
    /// polled at nearly the same time may never be woken (sled issues 1241, 1308).
    pub async fn flush(&self) -> Result<()> {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || db.flush())
            .await
            .map_err(|e| Error::Serve(format!("flush task: {e}")))??;
        Ok(())
    }

    pub fn deployments(&self) -> Result<Vec<fpb::Deployment>> {
        all(&self.deployments, "deployments")
    }

    pub fn put_deployment(&self, d: &fpb::Deployment) -> Result<()> {
        self.deployments
            .insert(d.name.as_bytes(), d.encode_to_vec())?;
        Ok(())
    }

    pub fn delete_deployment(&self, name: &str) -> Result<()> {
        self.deployments.remove(name.as_bytes())?;
        Ok(())
    }

    pub fn devices(&self) -> Result<Vec<fpb::Device>> {
        all(&self.devices, "devices")
    }

    pub fn put_device(&self, d: &fpb::Device) -> Result<()> {
        self.devices.insert(d.id.as_bytes(), d.encode_to_vec())?;
        Ok(())
    }

    pub fn assignments(&self) -> Result<Vec<(String, fpb::Assignments)>> {
        self.assignments
            .iter()
            .map(|kv| {
                let (k, v) = kv?;
                Ok((
                    String::from_utf8_lossy(&k).into_owned(),
                    decode("assignments", &k, &v)?,
                ))
            })
            .collect()
    }

    pub fn put_assignments(&self, device: &str, a: &fpb::Assignments) -> Result<()> {
        self.assignments
            .insert(device.as_bytes(), a.encode_to_vec())?;
        Ok(())
    }

    pub fn rollouts(&self) -> Result<Vec<fpb::Rollout>> {
        all(&self.rollouts, "rollouts")
    }

    pub fn put_rollout(&self, r: &fpb::Rollout) -> Result<()> {
        self.rollouts
            .insert(r.deployment.as_bytes(), r.encode_to_vec())?;
        Ok(())
    }

    pub fn delete_rollout(&self, deployment: &str) -> Result<()> {
        self.rollouts.remove(deployment.as_bytes())?;
        Ok(())
    }

    pub fn last_revision(&self) -> Result<u64> {
        Ok(self.events.last()?.map_or(0, |(k, _)| {
            k.as_ref().try_into().map_or(0, u64::from_be_bytes)
        }))
    }

    /// Appends an event (its revision already set), dropping the oldest past
    /// [`RETAINED_EVENTS`].
    pub fn append_event(&self, event: &fpb::WatchResponse) -> Result<()> {
        self.events
            .insert(event.revision.to_be_bytes(), event.encode_to_vec())?;
        if event.revision > RETAINED_EVENTS {
            let cutoff = (event.revision - RETAINED_EVENTS).to_be_bytes();
            for key in self.events.range(..cutoff).keys() {
                self.events.remove(key?)?;
            }
        }
        Ok(())
    }

    /// Events after `revision`, oldest first, and the oldest revision still kept.
    pub fn events_after(&self, revision: u64) -> Result<(Vec<fpb::WatchResponse>, u64)> {
        let first = self.events.first()?.map_or(0, |(k, _)| {
            k.as_ref().try_into().map_or(0, u64::from_be_bytes)
        });
        let events = self
            .events
            .range((revision + 1).to_be_bytes()..)
            .map(|kv| {
                let (k, v) = kv?;
                decode("events", &k, &v)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok((events, first))
    }
}
