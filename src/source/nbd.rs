//! A disk exported over NBD (qemu-nbd, qemu-storage-daemon, nbdkit).
//!
//! Allocation comes from `base:allocation`: only ranges flagged `NBD_STATE_ZERO` are left
//! unread. `NBD_STATE_HOLE` alone says nothing about the contents (by the NBD spec a hole
//! without the zero flag may read back data, e.g. nbdkit's `sh`/`eval` plugins or a
//! server with a backing file), so such ranges are read like data. With a
//! bitmap name, the `qemu:dirty-bitmap:NAME` context gives the extents changed since the
//! bitmap was last cleared.

use super::{BlockSource, Extent, SourceFormat};
use crate::error::Result;
use crate::nbd::proto::{STATE_DIRTY, STATE_ZERO};
use crate::nbd::{BASE_ALLOCATION, NbdClient, NbdTlsClient, NbdUri, dirty_bitmap_context};

/// An NBD export as a block source.
pub struct NbdSource {
    client: NbdClient,
    uri: String,
    description: Option<String>,
    bitmap: Option<String>,
}

impl NbdSource {
    /// Connect to `uri`; with `bitmap`, also negotiate that dirty bitmap's context.
    pub fn open(uri: &str, bitmap: Option<&str>) -> Result<NbdSource> {
        Self::open_tls(uri, bitmap, None)
    }

    /// [`NbdSource::open`] with the TLS settings of an `nbds://` URI.
    pub fn open_tls(
        uri: &str,
        bitmap: Option<&str>,
        tls: Option<&NbdTlsClient>,
    ) -> Result<NbdSource> {
        let parsed = NbdUri::parse(uri)?;
        let mut meta = vec![BASE_ALLOCATION.to_string()];
        if let Some(b) = bitmap {
            meta.push(dirty_bitmap_context(b));
        }
        let client = NbdClient::connect_tls(&parsed, &meta, tls)?;
        Ok(NbdSource {
            client,
            uri: uri.to_string(),
            description: None,
            bitmap: bitmap.map(str::to_owned),
        })
    }

    /// Set the deadline of each request, from sending it to the end of its reply
    /// (default [`crate::nbd::client::REQUEST_DEADLINE`], 120 s).
    pub fn set_request_deadline(&mut self, d: std::time::Duration) {
        self.client.set_request_deadline(d);
    }

    /// Describe the source as `d` instead of its URI (a temporary export of a live disk
    /// is better named by the disk).
    pub fn described_as(mut self, d: String) -> NbdSource {
        self.description = Some(d);
        self
    }
}

impl BlockSource for NbdSource {
    fn format(&self) -> SourceFormat {
        SourceFormat::Nbd
    }

    fn describe(&self) -> String {
        self.description.clone().unwrap_or_else(|| self.uri.clone())
    }

    fn size(&self) -> u64 {
        self.client.size()
    }

    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.client.read(offset, buf)
    }

    fn allocated_extents(&mut self) -> Result<Vec<Extent>> {
        // Data = not ZERO. A HOLE without ZERO may hold data: it is read.
        self.client.extents_with(BASE_ALLOCATION, STATE_ZERO, false)
    }

    fn prefers_large_reads(&self) -> bool {
        true
    }

    fn will_read(&mut self, ranges: &[Extent]) {
        self.client.read_ahead(ranges);
    }

    fn set_cancel(&mut self, cancel: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>) {
        self.client.set_cancel(cancel);
    }

    fn as_send(&mut self) -> Option<&mut (dyn BlockSource + Send)> {
        Some(self)
    }

    fn dirty_extents(&mut self) -> Option<Result<Vec<Extent>>> {
        let b = self.bitmap.clone()?;
        Some(
            self.client
                .extents_with(&dirty_bitmap_context(&b), STATE_DIRTY, true),
        )
    }
}
