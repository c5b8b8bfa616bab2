//! A source read while holding QEMU's image locks on its file (see `lock`): every call
//! goes to the inner source; the locks are released when the source is dropped.

use std::path::PathBuf;

use super::lock::ImageLock;
use super::{BlockSource, Extent, SourceFormat};
use crate::error::Result;

pub(crate) struct Locked {
    // Field order: the reader is closed before the locks are released.
    pub inner: Box<dyn BlockSource>,
    pub lock: ImageLock,
}

impl BlockSource for Locked {
    fn set_cancel(&mut self, cancel: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>) {
        self.inner.set_cancel(cancel);
    }

    fn format(&self) -> SourceFormat {
        self.inner.format()
    }
    fn reader(&self) -> String {
        self.inner.reader()
    }
    fn encryption(&self) -> Option<String> {
        self.inner.encryption()
    }
    fn inconsistent(&self) -> Option<String> {
        self.lock
            .inconsistent
            .clone()
            .or_else(|| self.inner.inconsistent())
    }
    fn describe(&self) -> String {
        self.inner.describe()
    }
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn allocated_extents(&mut self) -> Result<Vec<Extent>> {
        self.inner.allocated_extents()
    }
    fn backing(&self) -> Option<PathBuf> {
        self.inner.backing()
    }
    fn top_layer_extents(&mut self) -> Result<Vec<Extent>> {
        self.inner.top_layer_extents()
    }
    fn prefers_large_reads(&self) -> bool {
        self.inner.prefers_large_reads()
    }
    fn dirty_extents(&mut self) -> Option<Result<Vec<Extent>>> {
        self.inner.dirty_extents()
    }
}
