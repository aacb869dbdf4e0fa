//! Subscribers: reader groups that bound a stream's truncation (consumption-based
//! retention). One record per (stream, group) at `subscribers/<scope>/<stream>/<group>`
//! holding the group's last checkpoint cut on that stream (none until it checkpoints; a
//! subscriber without a cut holds all truncation back).

use super::{Controller, ControllerError, Record, now_ms};
use crate::store::{MetaError, MetaStore};
use rkyv::{Archive, Deserialize, Serialize};

#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct SubscriberRecord {
    /// (segment number, offset) of the last checkpoint; `None` before the first one.
    pub positions: Option<Vec<(u64, u64)>>,
    pub updated_unix_ms: u64,
}

record!(SubscriberRecord, "a subscriber record");

fn prefix(scope: &str, stream: &str) -> String {
    format!("subscribers/{scope}/{stream}/")
}

fn key(scope: &str, stream: &str, group: &str) -> String {
    format!("{}{group}", prefix(scope, stream))
}

fn check_group(group: &str) -> Result<(), ControllerError> {
    if group.is_empty() || group.len() > 200 || group.chars().any(char::is_control) {
        return Err(ControllerError::InvalidName(format!("'{group}' is not a reader group name")));
    }
    Ok(())
}

impl<S: MetaStore> Controller<S> {
    /// Registers `group` as a subscriber of a stream (again: no change).
    pub async fn add_subscriber(&self, scope: &str, stream: &str, group: &str) -> Result<(), ControllerError> {
        check_group(group)?;
        self.get_stream(scope, stream).await?;
        let r = SubscriberRecord { positions: None, updated_unix_ms: now_ms() };
        match self.store.compare_and_swap(&key(scope, stream, group), 0, r.encode()).await {
            Ok(_) | Err(MetaError::Conflict { .. }) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    pub async fn remove_subscriber(&self, scope: &str, stream: &str, group: &str) -> Result<(), ControllerError> {
        check_group(group)?;
        self.store.delete(&key(scope, stream, group), None).await?;
        Ok(())
    }

    /// Records a subscriber's new checkpoint cut; `false` if `group` is not a subscriber.
    pub async fn update_subscriber(
        &self,
        scope: &str,
        stream: &str,
        group: &str,
        positions: Vec<(u64, u64)>,
    ) -> Result<bool, ControllerError> {
        check_group(group)?;
        let now = now_ms();
        let changed = self
            .update_key(&key(scope, stream, group), |r: &mut SubscriberRecord| {
                r.positions = Some(positions.clone());
                r.updated_unix_ms = now;
                Ok(true)
            })
            .await?;
        Ok(changed.is_some())
    }

    /// A stream's subscribers: (group, record).
    pub async fn list_subscribers(
        &self,
        scope: &str,
        stream: &str,
    ) -> Result<Vec<(String, SubscriberRecord)>, ControllerError> {
        let p = prefix(scope, stream);
        let mut out = Vec::new();
        for (k, v) in self.store.range(&p).await? {
            out.push((k[p.len()..].to_string(), SubscriberRecord::decode(&k, &v.value)?));
        }
        Ok(out)
    }

    /// Removes every subscriber of a stream (when it is deleted).
    pub async fn remove_subscribers(&self, scope: &str, stream: &str) -> Result<(), ControllerError> {
        for (group, _) in self.list_subscribers(scope, stream).await? {
            self.store.delete(&key(scope, stream, &group), None).await?;
        }
        Ok(())
    }
}
