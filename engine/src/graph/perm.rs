//! Permissions and child roles, with QEMU's bit values and rules
//! (`include/block/block-common.h`, `bdrv_default_perms` in `block.c`).
//!
//! Every edge into a node carries `perm` (what that parent does to the node) and `shared`
//! (what it lets every other parent do). Edge B is compatible with edge A iff
//! `B.perm & !A.shared` is empty. A node passes its parents' needs on to its children
//! through [`default_child_perm`], which follows the child's role.

use std::fmt;
use std::ops::{BitAnd, BitOr, Not};

/// A set of block permissions (QEMU's `BLK_PERM_*`).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Perm(u8);

impl Perm {
    pub const NONE: Perm = Perm(0);
    /// The user sees a self-consistent image.
    pub const CONSISTENT_READ: Perm = Perm(0x01);
    /// May change the visible contents.
    pub const WRITE: Perm = Perm(0x02);
    /// May write without changing the visible contents.
    pub const WRITE_UNCHANGED: Perm = Perm(0x04);
    /// May change the size.
    pub const RESIZE: Perm = Perm(0x08);
    pub const ALL: Perm = Perm(0x0f);

    /// Each permission bit with the name QEMU prints in conflict messages and the name
    /// `x-debug-query-block-graph` uses, in bit order.
    pub const BITS: [(Perm, &'static str, &'static str); 4] = [
        (Perm::CONSISTENT_READ, "consistent read", "consistent-read"),
        (Perm::WRITE, "write", "write"),
        (Perm::WRITE_UNCHANGED, "write unchanged", "write-unchanged"),
        (Perm::RESIZE, "resize", "resize"),
    ];

    pub const fn bits(self) -> u8 {
        self.0
    }

    /// Keeps only defined bits.
    pub const fn from_bits_truncate(bits: u8) -> Perm {
        Perm(bits & Perm::ALL.0)
    }

    pub const fn contains(self, other: Perm) -> bool {
        self.0 & other.0 == other.0
    }

    pub const fn intersects(self, other: Perm) -> bool {
        self.0 & other.0 != 0
    }

    pub const fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// Bit indexes 0..4 that are set (the lock byte offsets of file locking).
    pub fn indexes(self) -> impl Iterator<Item = u32> {
        (0..4).filter(move |i| self.0 & (1 << i) != 0)
    }

    /// QEMU's human list: `'write, resize'` without quotes, as in conflict messages.
    pub fn human(self) -> String {
        Perm::BITS
            .iter()
            .filter(|(p, _, _)| self.contains(*p))
            .map(|(_, human, _)| *human)
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Wire names (`consistent-read`, `write`, ...), in bit order.
    pub fn names(self) -> Vec<&'static str> {
        Perm::BITS
            .iter()
            .filter(|(p, _, _)| self.contains(*p))
            .map(|(_, _, wire)| *wire)
            .collect()
    }

    /// Parses one wire name.
    pub fn from_name(name: &str) -> Option<Perm> {
        Perm::BITS
            .iter()
            .find(|(_, _, wire)| *wire == name)
            .map(|(p, _, _)| *p)
    }
}

impl BitOr for Perm {
    type Output = Perm;
    fn bitor(self, rhs: Perm) -> Perm {
        Perm(self.0 | rhs.0)
    }
}

impl BitAnd for Perm {
    type Output = Perm;
    fn bitand(self, rhs: Perm) -> Perm {
        Perm(self.0 & rhs.0)
    }
}

impl Not for Perm {
    type Output = Perm;
    fn not(self) -> Perm {
        Perm(!self.0 & Perm::ALL.0)
    }
}

impl fmt::Debug for Perm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Perm[{}]", self.names().join("|"))
    }
}

/// What a child is to its parent (QEMU's `BDRV_CHILD_*`).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct ChildRole(u8);

impl ChildRole {
    /// Holds guest-visible data.
    pub const DATA: ChildRole = ChildRole(0x01);
    /// Holds the parent's metadata (a qcow2 file).
    pub const METADATA: ChildRole = ChildRole(0x02);
    /// The filtered child of a filter: everything passes through.
    pub const FILTERED: ChildRole = ChildRole(0x04);
    /// A backing (copy-on-write) child.
    pub const COW: ChildRole = ChildRole(0x08);
    /// The child whose name and size the parent takes (at most one).
    pub const PRIMARY: ChildRole = ChildRole(0x10);
    /// A format node's image file: data, metadata and primary.
    pub const IMAGE: ChildRole = ChildRole(0x01 | 0x02 | 0x10);

    pub const fn contains(self, other: ChildRole) -> bool {
        self.0 & other.0 == other.0
    }

    pub const fn bits(self) -> u8 {
        self.0
    }
}

impl BitOr for ChildRole {
    type Output = ChildRole;
    fn bitor(self, rhs: ChildRole) -> ChildRole {
        ChildRole(self.0 | rhs.0)
    }
}

impl fmt::Debug for ChildRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names = [
            (ChildRole::DATA, "data"),
            (ChildRole::METADATA, "metadata"),
            (ChildRole::FILTERED, "filtered"),
            (ChildRole::COW, "cow"),
            (ChildRole::PRIMARY, "primary"),
        ];
        let set: Vec<_> = names
            .iter()
            .filter(|(r, _)| self.contains(*r))
            .map(|(_, n)| *n)
            .collect();
        write!(f, "Role[{}]", set.join("|"))
    }
}

/// What a node needs from a child in `role`, given what its own parents take (`perm`)
/// and share (`shared`) and whether the node is writable. QEMU's `bdrv_default_perms`:
/// filtered children pass everything through; metadata children are always read
/// consistently, written when the node is writable, and never let anyone else write or
/// resize; data children never let anyone else resize; cow children are only read.
pub fn default_child_perm(
    role: ChildRole,
    writable: bool,
    perm: Perm,
    shared: Perm,
) -> (Perm, Perm) {
    if role.contains(ChildRole::COW) {
        let shared = if shared.contains(Perm::WRITE) {
            Perm::WRITE | Perm::RESIZE
        } else {
            Perm::NONE
        };
        return (
            perm & Perm::CONSISTENT_READ,
            shared | Perm::CONSISTENT_READ | Perm::WRITE_UNCHANGED,
        );
    }
    let (mut perm, mut shared) = (perm, shared);
    if role.contains(ChildRole::FILTERED) {
        return (perm, shared);
    }
    if role.contains(ChildRole::METADATA) {
        if writable {
            perm = perm | Perm::WRITE | Perm::RESIZE;
        }
        perm = perm | Perm::CONSISTENT_READ;
        shared = shared & !(Perm::WRITE | Perm::RESIZE);
    }
    if role.contains(ChildRole::DATA) {
        shared = shared & !Perm::RESIZE;
        if perm.contains(Perm::WRITE_UNCHANGED) {
            perm = perm | Perm::WRITE;
        }
        if perm.contains(Perm::WRITE) {
            perm = perm | Perm::RESIZE;
        }
    }
    (perm, shared)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_qemu() {
        let p = Perm::WRITE | Perm::RESIZE;
        assert_eq!(p.human(), "write, resize");
        assert_eq!(p.names(), ["write", "resize"]);
        assert_eq!(
            Perm::from_name("write-unchanged"),
            Some(Perm::WRITE_UNCHANGED)
        );
        assert_eq!(Perm::from_name("graph-mod"), None);
        assert_eq!((!Perm::WRITE).bits(), 0x0d);
        assert_eq!(p.indexes().collect::<Vec<_>>(), [1, 3]);
    }

    #[test]
    fn a_writable_format_node_takes_write_and_resize_on_its_metadata_child() {
        // Observed in QEMU: qcow2 -> file: perm [resize, write, consistent-read],
        // shared [write-unchanged, consistent-read] under a writable export.
        let (perm, shared) = default_child_perm(
            ChildRole::IMAGE,
            true,
            Perm::CONSISTENT_READ | Perm::WRITE,
            Perm::CONSISTENT_READ | Perm::WRITE_UNCHANGED,
        );
        assert_eq!(perm, Perm::CONSISTENT_READ | Perm::WRITE | Perm::RESIZE);
        assert_eq!(shared, Perm::CONSISTENT_READ | Perm::WRITE_UNCHANGED);
    }

    #[test]
    fn a_filtered_child_passes_through_and_a_data_child_unshares_resize() {
        let all = (Perm::CONSISTENT_READ, Perm::ALL);
        assert_eq!(
            default_child_perm(ChildRole::FILTERED | ChildRole::PRIMARY, true, all.0, all.1),
            all
        );
        let (perm, shared) = default_child_perm(
            ChildRole::DATA | ChildRole::PRIMARY,
            true,
            Perm::WRITE,
            Perm::ALL,
        );
        assert_eq!(perm, Perm::WRITE | Perm::RESIZE);
        assert_eq!(shared, !Perm::RESIZE);
    }

    #[test]
    fn a_cow_child_is_only_read() {
        let (perm, shared) =
            default_child_perm(ChildRole::COW, true, Perm::ALL, Perm::CONSISTENT_READ);
        assert_eq!(perm, Perm::CONSISTENT_READ);
        assert_eq!(shared, Perm::CONSISTENT_READ | Perm::WRITE_UNCHANGED);
    }
}
