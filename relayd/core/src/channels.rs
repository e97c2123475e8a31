//! Channel membership: local members per channel, and which other relays
//! have members (their *interest*), learned from flooded announcements.

use std::collections::{BTreeSet, HashMap};

use smallvec::SmallVec;

use crate::ids::{ChannelId, ClientId, RelayId, SourceId};
use crate::wire::client::Role;

/// A local member of a channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// The client connection.
    pub client: ClientId,
    /// What it may do.
    pub role: Role,
    /// Its source id (from app and user).
    pub source: SourceId,
    /// Its user id.
    pub user: String,
}

#[derive(Debug, Clone)]
struct LocalChannel {
    members: Vec<Member>,
}

/// Another relay's announced interest.
#[derive(Debug, Clone)]
struct Remote {
    version: u64,
    channels: BTreeSet<ChannelId>,
}

/// Local members and remote interest.
#[derive(Debug, Clone, Default)]
pub struct Channels {
    local: HashMap<ChannelId, LocalChannel>,
    remote: HashMap<RelayId, Remote>,
    /// Inverse of `remote`: the relays with members of a channel.
    interested: HashMap<ChannelId, SmallVec<[RelayId; 4]>>,
}

impl Channels {
    /// No members anywhere.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a member (replacing the client's earlier membership). Returns
    /// true when the channel had no local member before.
    pub fn join(&mut self, channel: ChannelId, member: Member) -> bool {
        let entry = self.local.entry(channel);
        let first = matches!(entry, std::collections::hash_map::Entry::Vacant(_));
        let ch = entry.or_insert_with(|| LocalChannel {
            members: Vec::new(),
        });
        ch.members.retain(|m| m.client != member.client);
        ch.members.push(member);
        first
    }

    /// Removes a member. Returns true when that emptied the channel.
    pub fn leave(&mut self, channel: ChannelId, client: ClientId) -> bool {
        let Some(ch) = self.local.get_mut(&channel) else {
            return false;
        };
        let before = ch.members.len();
        ch.members.retain(|m| m.client != client);
        if ch.members.is_empty() {
            self.local.remove(&channel);
            return before > 0;
        }
        false
    }

    /// Local members of a channel.
    pub fn members(&self, channel: ChannelId) -> &[Member] {
        self.local.get(&channel).map_or(&[], |c| &c.members)
    }

    /// A client's membership of a channel.
    pub fn member(&self, channel: ChannelId, client: ClientId) -> Option<&Member> {
        self.members(channel).iter().find(|m| m.client == client)
    }

    /// Channels with local members, sorted.
    pub fn local_channels(&self) -> Vec<ChannelId> {
        let mut v: Vec<ChannelId> = self.local.keys().copied().collect();
        v.sort_unstable();
        v
    }

    /// Number of channels with local members.
    pub fn local_channel_count(&self) -> usize {
        self.local.len()
    }

    /// Applies relay `origin`'s announcement if it is newer than what we
    /// have. Returns true when applied (then it should be flooded on).
    pub fn apply_interest(
        &mut self,
        origin: RelayId,
        version: u64,
        channels: &[ChannelId],
    ) -> bool {
        if self
            .remote
            .get(&origin)
            .is_some_and(|r| r.version >= version)
        {
            return false;
        }
        let new: BTreeSet<ChannelId> = channels.iter().copied().collect();
        let old = self
            .remote
            .insert(
                origin,
                Remote {
                    version,
                    channels: new.clone(),
                },
            )
            .map(|r| r.channels)
            .unwrap_or_default();
        for c in old.difference(&new) {
            if let Some(v) = self.interested.get_mut(c) {
                v.retain(|r| *r != origin);
                if v.is_empty() {
                    self.interested.remove(c);
                }
            }
        }
        for c in new.difference(&old) {
            self.interested.entry(*c).or_default().push(origin);
        }
        true
    }

    /// The latest announcement known from `origin`.
    pub fn interest_of(&self, origin: RelayId) -> Option<(u64, Vec<ChannelId>)> {
        self.remote
            .get(&origin)
            .map(|r| (r.version, r.channels.iter().copied().collect()))
    }

    /// Relays whose announcements we hold.
    pub fn known_origins(&self) -> Vec<RelayId> {
        self.remote.keys().copied().collect()
    }

    /// Other relays with members of `channel`.
    pub fn interested_relays(&self, channel: ChannelId) -> &[RelayId] {
        self.interested.get(&channel).map_or(&[], |v| v.as_slice())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(c: u64) -> Member {
        Member {
            client: ClientId(c),
            role: Role::Publisher,
            source: SourceId(c),
            user: format!("u{c}"),
        }
    }

    #[test]
    fn local_membership_edges() {
        let mut ch = Channels::new();
        let c = ChannelId(1);
        assert!(ch.join(c, member(1)));
        assert!(!ch.join(c, member(2)));
        assert!(!ch.join(c, member(2)), "rejoin replaces");
        assert_eq!(ch.members(c).len(), 2);
        assert!(!ch.leave(c, ClientId(1)));
        assert!(ch.leave(c, ClientId(2)));
        assert!(!ch.leave(c, ClientId(2)));
        assert!(ch.local_channels().is_empty());
    }

    #[test]
    fn interest_versions_and_index() {
        let mut ch = Channels::new();
        let (r2, r3) = (RelayId(2), RelayId(3));
        assert!(ch.apply_interest(r2, 5, &[ChannelId(1), ChannelId(2)]));
        assert!(ch.apply_interest(r3, 1, &[ChannelId(2)]));
        assert_eq!(ch.interested_relays(ChannelId(2)), &[r2, r3]);
        assert!(!ch.apply_interest(r2, 5, &[]), "same version is ignored");
        assert!(!ch.apply_interest(r2, 4, &[]), "older version is ignored");
        assert!(ch.apply_interest(r2, 6, &[ChannelId(3)]));
        assert!(ch.interested_relays(ChannelId(1)).is_empty());
        assert_eq!(ch.interested_relays(ChannelId(2)), &[r3]);
        assert_eq!(ch.interested_relays(ChannelId(3)), &[r2]);
        assert_eq!(ch.interest_of(r2), Some((6, vec![ChannelId(3)])));
    }
}
