//! Device (global) memory: allocations at fixed addresses separated by unmapped guard gaps, so
//! an access that runs off one allocation never lands in another. Every access is checked
//! against the allocation bounds; the caller checks alignment.

/// A device address (as the kernel sees it).
pub type DevicePtr = u64;

/// First device address; low addresses (and null) are never mapped.
const BASE: u64 = 0x0000_1000_0000_0000;
/// Unmapped bytes after every allocation.
const GUARD: u64 = 1 << 16;

#[derive(Debug)]
pub(crate) struct Alloc {
    pub(crate) base: u64,
    pub(crate) data: Vec<u8>,
    pub(crate) live: bool,
}

/// All device allocations, sorted by base address.
#[derive(Debug, Default)]
pub(crate) struct Memory {
    pub(crate) allocs: Vec<Alloc>,
    next: u64,
    last: usize,
}

impl Memory {
    pub(crate) fn alloc(&mut self, bytes: u64) -> DevicePtr {
        if self.next == 0 {
            self.next = BASE;
        }
        let base = self.next;
        self.next = (base + bytes.max(1) + GUARD).div_ceil(256) * 256;
        self.allocs.push(Alloc { base, data: vec![0; bytes as usize], live: true });
        base
    }

    pub(crate) fn free(&mut self, p: DevicePtr) -> bool {
        match self.allocs.binary_search_by_key(&p, |a| a.base) {
            Ok(i) if self.allocs[i].live => {
                self.allocs[i].live = false;
                self.allocs[i].data = Vec::new();
                true
            }
            _ => false,
        }
    }

    /// (allocation index, offset) for an access of `size` bytes at `addr`, if fully inside a
    /// live allocation.
    #[inline(always)]
    pub(crate) fn find(&mut self, addr: u64, size: u64) -> Option<(usize, usize)> {
        if let Some(a) = self.allocs.get(self.last) {
            if addr >= a.base && addr.wrapping_add(size) <= a.base + a.data.len() as u64 && a.live {
                return Some((self.last, (addr - a.base) as usize));
            }
        }
        let i = match self.allocs.binary_search_by_key(&addr, |a| a.base) {
            Ok(i) => i,
            Err(0) => return None,
            Err(i) => i - 1,
        };
        let a = &self.allocs[i];
        if a.live && addr.checked_add(size)? <= a.base + a.data.len() as u64 {
            self.last = i;
            Some((i, (addr - a.base) as usize))
        } else {
            None
        }
    }

    /// Describe where a bad address lies, for error messages.
    pub(crate) fn describe(&self, addr: u64) -> String {
        let i = match self.allocs.binary_search_by_key(&addr, |a| a.base) {
            Ok(i) => i,
            Err(0) => return "below every allocation".into(),
            Err(i) => i - 1,
        };
        let a = &self.allocs[i];
        if !a.live {
            return format!("inside freed allocation at {:#x}", a.base);
        }
        let end = a.base + a.data.len() as u64;
        if addr >= end {
            format!("{} bytes past the end of the {}-byte allocation at {:#x}", addr - end, a.data.len(), a.base)
        } else {
            format!("access runs past the end of the {}-byte allocation at {:#x}", a.data.len(), a.base)
        }
    }

    pub(crate) fn slice(&mut self, addr: u64, len: usize) -> Option<&mut [u8]> {
        let (i, o) = self.find(addr, len as u64)?;
        Some(&mut self.allocs[i].data[o..o + len])
    }
}
