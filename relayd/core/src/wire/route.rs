//! Delivery trees carried in relay-to-relay media datagrams.
//!
//! The ingress relay decides the whole path of a packet: the union of its
//! routes to every relay that wants the channel, merged into a tree rooted
//! at itself. Each relay on the way receives the subtree rooted at itself,
//! delivers locally if it is marked, and sends each child its own subtree:
//! one copy per next hop, and the routes cannot loop or disagree while
//! tables change, because transit relays do not look anything up.
//!
//! Encoding, in preorder: per node `varint(relay id)` then one byte, the
//! top bit "deliver here" and the low seven bits the number of children.
//! A subtree is a contiguous byte range, so a transit relay forwards a
//! child's subtree by slicing, without re-encoding.

use std::ops::Range;

use bytes::{BufMut, BytesMut};
use smallvec::SmallVec;

use super::codec::{DecodeError, Reader, WriteExt};
use crate::ids::RelayId;

/// Most nodes a tree may have.
pub const MAX_TREE_NODES: usize = 64;
/// Most children of one node (seven bits).
pub const MAX_CHILDREN: usize = 127;

const DELIVER: u8 = 0x80;

/// One node of a decoded tree.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TreeNode {
    /// The relay.
    pub relay: RelayId,
    /// Deliver to the relay's local subscribers.
    pub deliver: bool,
    /// Number of children.
    pub children: u8,
    /// Depth below the root (root is 0).
    pub depth: u8,
    span: (u16, u16),
}

/// A decoded, validated delivery tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteTree {
    /// Nodes in preorder; `nodes[0]` is the root.
    nodes: SmallVec<[TreeNode; 8]>,
}

impl RouteTree {
    /// Decodes and validates a tree: at most [`MAX_TREE_NODES`] nodes, no
    /// relay twice on a root-to-leaf path, every leaf a delivery, nothing
    /// left over.
    pub fn decode(bytes: &[u8]) -> Result<RouteTree, DecodeError> {
        let mut r = Reader::new(bytes);
        let mut nodes: SmallVec<[TreeNode; 8]> = SmallVec::new();
        // (node index, children still to read)
        let mut stack: SmallVec<[(usize, u8); 8]> = SmallVec::new();
        loop {
            if nodes.len() == MAX_TREE_NODES {
                return Err(DecodeError::Invalid("route tree size"));
            }
            let start = r.position();
            let id = r.varint()?;
            let relay = RelayId(u32::try_from(id).map_err(|_| DecodeError::Invalid("relay id"))?);
            let flags = r.u8()?;
            let children = flags & !DELIVER;
            let deliver = flags & DELIVER != 0;
            if children == 0 && !deliver {
                return Err(DecodeError::Invalid("route leaf without delivery"));
            }
            if stack.iter().any(|&(i, _)| nodes[i].relay == relay) {
                return Err(DecodeError::Invalid("route loop"));
            }
            let idx = nodes.len();
            nodes.push(TreeNode {
                relay,
                deliver,
                children,
                depth: stack.len() as u8,
                span: (start as u16, 0),
            });
            if let Some(top) = stack.last_mut() {
                top.1 -= 1;
            }
            if children > 0 {
                stack.push((idx, children));
            } else {
                nodes[idx].span.1 = r.position() as u16;
            }
            // Close every subtree whose children are all read.
            while let Some(&(i, 0)) = stack.last() {
                nodes[i].span.1 = r.position() as u16;
                stack.pop();
            }
            if stack.is_empty() {
                break;
            }
        }
        r.finish()?;
        Ok(RouteTree { nodes })
    }

    /// The root node.
    pub fn root(&self) -> &TreeNode {
        &self.nodes[0]
    }

    /// All nodes in preorder.
    pub fn nodes(&self) -> &[TreeNode] {
        &self.nodes
    }

    /// Indices of the children of node `i`.
    pub fn children(&self, i: usize) -> impl Iterator<Item = usize> + '_ {
        let depth = self.nodes[i].depth;
        let end = self.subtree_end(i);
        (i + 1..end).filter(move |&j| self.nodes[j].depth == depth + 1)
    }

    fn subtree_end(&self, i: usize) -> usize {
        let depth = self.nodes[i].depth;
        (i + 1..self.nodes.len())
            .find(|&j| self.nodes[j].depth <= depth)
            .unwrap_or(self.nodes.len())
    }

    /// Byte range of node `i`'s subtree in the encoding it was decoded from.
    pub fn span(&self, i: usize) -> Range<usize> {
        let (a, b) = self.nodes[i].span;
        a as usize..b as usize
    }

    /// Relays marked for delivery in node `i`'s subtree.
    pub fn destinations(&self, i: usize) -> impl Iterator<Item = RelayId> + '_ {
        let end = self.subtree_end(i);
        self.nodes[i..end]
            .iter()
            .filter(|n| n.deliver)
            .map(|n| n.relay)
    }
}

#[derive(Debug, Clone)]
struct BuildNode {
    relay: RelayId,
    deliver: bool,
    children: SmallVec<[usize; 4]>,
}

/// Builds a delivery tree from paths that all start at the root.
#[derive(Debug, Clone)]
pub struct TreeBuilder {
    nodes: Vec<BuildNode>,
}

/// Why a path could not be added to a tree.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TreeError {
    /// The path does not start at the root, or is shorter than two relays.
    #[error("path does not start at the root")]
    WrongRoot,
    /// The tree would exceed its size limits.
    #[error("delivery tree too large")]
    TooLarge,
    /// The path visits a relay twice.
    #[error("path has a loop")]
    Loop,
}

impl TreeBuilder {
    /// A tree with only the root.
    pub fn new(root: RelayId) -> Self {
        Self {
            nodes: vec![BuildNode {
                relay: root,
                deliver: false,
                children: SmallVec::new(),
            }],
        }
    }

    /// Merges `path` (root first) and marks its last relay for delivery.
    pub fn add_path(&mut self, path: &[RelayId]) -> Result<(), TreeError> {
        if path.len() < 2 || path[0] != self.nodes[0].relay {
            return Err(TreeError::WrongRoot);
        }
        if path.iter().enumerate().any(|(i, r)| path[..i].contains(r)) {
            return Err(TreeError::Loop);
        }
        let mut at = 0usize;
        for &relay in &path[1..] {
            let existing = self.nodes[at]
                .children
                .iter()
                .copied()
                .find(|&c| self.nodes[c].relay == relay);
            at = match existing {
                Some(c) => c,
                None => {
                    if self.nodes.len() == MAX_TREE_NODES
                        || self.nodes[at].children.len() == MAX_CHILDREN
                    {
                        return Err(TreeError::TooLarge);
                    }
                    self.nodes.push(BuildNode {
                        relay,
                        deliver: false,
                        children: SmallVec::new(),
                    });
                    let c = self.nodes.len() - 1;
                    self.nodes[at].children.push(c);
                    c
                }
            };
        }
        self.nodes[at].deliver = true;
        Ok(())
    }

    /// The root's children: the next hops, each with its subtree encoded.
    pub fn next_hops(&self) -> impl Iterator<Item = (RelayId, BytesMut)> + '_ {
        self.nodes[0].children.iter().map(|&c| {
            let mut buf = BytesMut::new();
            self.encode(c, &mut buf);
            (self.nodes[c].relay, buf)
        })
    }

    /// True when no path was added.
    pub fn is_empty(&self) -> bool {
        self.nodes[0].children.is_empty()
    }

    /// Appends the encoding of node `i`'s subtree.
    fn encode(&self, i: usize, buf: &mut BytesMut) {
        let n = &self.nodes[i];
        buf.put_varint(u64::from(n.relay.0));
        buf.put_u8(n.children.len() as u8 | if n.deliver { DELIVER } else { 0 });
        for &c in &n.children {
            self.encode(c, buf);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ids(v: &[u32]) -> Vec<RelayId> {
        v.iter().map(|&i| RelayId(i)).collect()
    }

    #[test]
    fn builds_one_copy_per_next_hop() {
        let mut t = TreeBuilder::new(RelayId(1));
        t.add_path(&ids(&[1, 2, 3])).unwrap();
        t.add_path(&ids(&[1, 2, 4])).unwrap();
        t.add_path(&ids(&[1, 2])).unwrap();
        t.add_path(&ids(&[1, 5])).unwrap();
        let hops: Vec<_> = t.next_hops().collect();
        assert_eq!(hops.len(), 2);
        let (hop, bytes) = &hops[0];
        assert_eq!(*hop, RelayId(2));
        let tree = RouteTree::decode(bytes).unwrap();
        assert_eq!(tree.root().relay, RelayId(2));
        assert!(tree.root().deliver);
        let children: Vec<_> = tree.children(0).map(|c| tree.nodes()[c].relay).collect();
        assert_eq!(children, ids(&[3, 4]));
        for c in tree.children(0) {
            // A child's span decodes on its own to the child's subtree.
            let sub = RouteTree::decode(&bytes[tree.span(c)]).unwrap();
            assert_eq!(sub.root().relay, tree.nodes()[c].relay);
        }
        let dests: Vec<_> = tree.destinations(0).collect();
        assert_eq!(dests, ids(&[2, 3, 4]));
    }

    #[test]
    fn rejects_bad_paths_and_trees() {
        let mut t = TreeBuilder::new(RelayId(1));
        assert_eq!(t.add_path(&ids(&[2, 3])), Err(TreeError::WrongRoot));
        assert_eq!(t.add_path(&ids(&[1])), Err(TreeError::WrongRoot));
        assert_eq!(t.add_path(&ids(&[1, 2, 1])), Err(TreeError::Loop));
        // Loop: 5 -> 6 -> 5.
        assert_eq!(
            RouteTree::decode(&[5, 1, 6, 1, 5, 0x80]),
            Err(DecodeError::Invalid("route loop"))
        );
        // A leaf that delivers nowhere.
        assert_eq!(
            RouteTree::decode(&[5, 1, 6, 0]),
            Err(DecodeError::Invalid("route leaf without delivery"))
        );
        // Declared children missing.
        assert_eq!(
            RouteTree::decode(&[5, 2, 6, 0x80]),
            Err(DecodeError::Truncated)
        );
        assert_eq!(
            RouteTree::decode(&[5, 0x80, 9]),
            Err(DecodeError::Trailing(1))
        );
        // Too many nodes: a chain of 65.
        let mut b = BytesMut::new();
        for i in 0..65u64 {
            b.put_varint(i);
            b.put_u8(if i == 64 { DELIVER } else { 1 });
        }
        assert_eq!(
            RouteTree::decode(&b),
            Err(DecodeError::Invalid("route tree size"))
        );
    }

    proptest! {
        #[test]
        fn decode_never_panics(data in prop::collection::vec(any::<u8>(), 0..80)) {
            if let Ok(t) = RouteTree::decode(&data) {
                for i in 0..t.nodes().len() {
                    let _ = t.span(i);
                    let _: Vec<_> = t.children(i).collect();
                }
            }
        }

        #[test]
        fn built_trees_roundtrip(paths in prop::collection::vec(prop::collection::vec(2u32..12, 1..4), 1..6)) {
            let mut t = TreeBuilder::new(RelayId(1));
            let mut expected = std::collections::BTreeSet::new();
            for p in &paths {
                let mut full = vec![RelayId(1)];
                for &h in p {
                    if !full.contains(&RelayId(h)) {
                        full.push(RelayId(h));
                    }
                }
                if full.len() >= 2 && t.add_path(&full).is_ok() {
                    expected.insert(*full.last().unwrap());
                }
            }
            let mut seen = std::collections::BTreeSet::new();
            for (_, bytes) in t.next_hops() {
                let tree = RouteTree::decode(&bytes).unwrap();
                seen.extend(tree.destinations(0));
            }
            prop_assert_eq!(seen, expected);
        }
    }
}
