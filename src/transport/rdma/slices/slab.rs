//! A bounded slab: items in reused slots, named by keys that carry the
//! slot's generation, so a key that outlived its item (a completion for a
//! slice settled meanwhile) finds nothing rather than another item.
//! Insertion and removal touch one slot; nothing allocates once the slab
//! has grown to its working size.

/// A slot's index (low 32 bits) and generation (high 32 bits).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Key(pub u64);

impl Key {
    fn new(index: u32, generation: u32) -> Key {
        Key((u64::from(generation) << 32) | u64::from(index))
    }

    fn index(self) -> usize {
        (self.0 & 0xffff_ffff) as usize
    }

    fn generation(self) -> u32 {
        (self.0 >> 32) as u32
    }
}

struct Slot<T> {
    generation: u32,
    item: Option<T>,
}

pub struct Slab<T> {
    slots: Vec<Slot<T>>,
    /// Empty slots, reused last-freed first (warm in cache).
    free: Vec<u32>,
    len: usize,
    max: usize,
}

impl<T> Slab<T> {
    /// A slab of at most `max` items.
    pub fn new(max: usize) -> Slab<T> {
        assert!(max > 0 && max <= u32::MAX as usize, "a slab of {max} items");
        Slab { slots: Vec::new(), free: Vec::new(), len: 0, max }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    /// Room for `n` more.
    pub fn has_room(&self, n: usize) -> bool {
        self.len + n <= self.max
    }

    /// Stores `item`; `None` when full.
    pub fn insert(&mut self, item: T) -> Option<Key> {
        if self.len >= self.max {
            return None;
        }
        self.len += 1;
        if let Some(i) = self.free.pop() {
            let slot = &mut self.slots[i as usize];
            debug_assert!(slot.item.is_none(), "a free slot holds an item");
            slot.item = Some(item);
            return Some(Key::new(i, slot.generation));
        }
        let i = self.slots.len() as u32;
        self.slots.push(Slot { generation: 0, item: Some(item) });
        Some(Key::new(i, 0))
    }

    pub fn get(&self, key: Key) -> Option<&T> {
        let slot = self.slots.get(key.index())?;
        if slot.generation != key.generation() {
            return None;
        }
        slot.item.as_ref()
    }

    pub fn get_mut(&mut self, key: Key) -> Option<&mut T> {
        let slot = self.slots.get_mut(key.index())?;
        if slot.generation != key.generation() {
            return None;
        }
        slot.item.as_mut()
    }

    /// The key of the item in slot `index`, if there is one.
    pub fn key_at(&self, index: usize) -> Option<Key> {
        let slot = self.slots.get(index)?;
        slot.item.as_ref()?;
        Some(Key::new(index as u32, slot.generation))
    }

    /// Takes the item out; its key (and every copy of it) finds nothing
    /// from now on.
    pub fn remove(&mut self, key: Key) -> Option<T> {
        let slot = self.slots.get_mut(key.index())?;
        if slot.generation != key.generation() {
            return None;
        }
        let item = slot.item.take()?;
        slot.generation = slot.generation.wrapping_add(1);
        self.free.push(key.index() as u32);
        self.len -= 1;
        Some(item)
    }

    /// Every item with its key, in slot order (the same order on every
    /// replay of a run).
    pub fn iter(&self) -> impl Iterator<Item = (Key, &T)> {
        self.slots
            .iter()
            .enumerate()
            .filter_map(|(i, s)| s.item.as_ref().map(|item| (Key::new(i as u32, s.generation), item)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_of_removed_items_find_nothing_and_slots_are_reused() {
        let mut s: Slab<&str> = Slab::new(2);
        let a = s.insert("a").unwrap();
        let b = s.insert("b").unwrap();
        assert_eq!(s.insert("c"), None, "bounded");
        assert_eq!((s.get(a), s.get(b), s.len()), (Some(&"a"), Some(&"b"), 2));
        assert_eq!(s.remove(a), Some("a"));
        assert_eq!(s.get(a), None, "a stale key finds nothing");
        assert_eq!(s.remove(a), None);
        let c = s.insert("c").unwrap();
        assert_ne!(c, a, "the slot is reused under a new generation");
        assert_eq!(s.get(a), None);
        assert_eq!(s.get(c), Some(&"c"));
        *s.get_mut(c).unwrap() = "d";
        assert_eq!(s.iter().map(|(k, v)| (k, *v)).collect::<Vec<_>>(), [(c, "d"), (b, "b")]);
        assert!(!s.has_room(1) && s.get(Key(u64::MAX)).is_none());
    }
}
