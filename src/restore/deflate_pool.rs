//! Deflating streamOptimized VMDK grains on worker threads.
//!
//! A streamOptimized image is written front to back and every grain is compressed;
//! compressing on the writer's thread made it the bottleneck of an OVA export (one core
//! at ~80 MB/s). The pool takes grains in disk order, compresses them on all cores and
//! gives the results back in the order they went in, so the writer can append them and
//! fill its grain tables exactly as before. At most 4 grains per worker are in flight,
//! which bounds memory.

use std::collections::BTreeMap;
use std::io;
use std::thread::JoinHandle;

use crossbeam_channel::{Receiver, Sender, bounded, unbounded};

/// Turns (key, data) into the bytes to append.
pub type Encode = fn(u64, &[u8]) -> io::Result<Vec<u8>>;

type Job = (u64, u64, Vec<u8>);
type Done = (u64, u64, io::Result<Vec<u8>>);

pub struct DeflatePool {
    jobs: Option<Sender<Job>>,
    done: Receiver<Done>,
    workers: Vec<JoinHandle<()>>,
    /// Sequence numbers: next to hand out, next to give back.
    next_in: u64,
    next_out: u64,
    ready: BTreeMap<u64, (u64, io::Result<Vec<u8>>)>,
    window: usize,
}

impl DeflatePool {
    /// A pool of `threads` workers running `encode`.
    pub fn new(threads: usize, encode: Encode) -> DeflatePool {
        let threads = threads.max(1);
        let window = threads * 4;
        let (jobs, job_rx) = bounded::<Job>(window);
        let (done_tx, done) = unbounded::<Done>();
        let workers = (0..threads)
            .map(|_| {
                let (rx, tx) = (job_rx.clone(), done_tx.clone());
                std::thread::spawn(move || {
                    for (seq, key, data) in rx {
                        if tx.send((seq, key, encode(key, &data))).is_err() {
                            return;
                        }
                    }
                })
            })
            .collect();
        DeflatePool {
            jobs: Some(jobs),
            done,
            workers,
            next_in: 0,
            next_out: 0,
            ready: BTreeMap::new(),
            window,
        }
    }

    /// Grains in flight at most.
    #[cfg(test)]
    pub fn window(&self) -> usize {
        self.window
    }

    /// Queue `data` under `key`; returns the results that are ready, in input order
    /// (waits for the oldest when the window is full).
    pub fn submit(&mut self, key: u64, data: Vec<u8>) -> io::Result<Vec<(u64, Vec<u8>)>> {
        let jobs = self
            .jobs
            .as_ref()
            .ok_or_else(|| io::Error::other("deflate pool already drained"))?;
        jobs.send((self.next_in, key, data))
            .map_err(|_| io::Error::other("deflate workers are gone"))?;
        self.next_in += 1;
        let mut out = Vec::new();
        while let Ok(d) = self.done.try_recv() {
            self.ready.insert(d.0, (d.1, d.2));
        }
        if (self.next_in - self.next_out) as usize > self.window {
            self.wait_for_next()?;
        }
        self.take_in_order(&mut out)?;
        Ok(out)
    }

    /// Everything still in flight, in input order.
    pub fn drain(&mut self) -> io::Result<Vec<(u64, Vec<u8>)>> {
        let mut out = Vec::new();
        while self.next_out < self.next_in {
            self.wait_for_next()?;
            self.take_in_order(&mut out)?;
        }
        Ok(out)
    }

    fn wait_for_next(&mut self) -> io::Result<()> {
        while !self.ready.contains_key(&self.next_out) {
            let d = self
                .done
                .recv()
                .map_err(|_| io::Error::other("deflate workers are gone"))?;
            self.ready.insert(d.0, (d.1, d.2));
        }
        Ok(())
    }

    fn take_in_order(&mut self, out: &mut Vec<(u64, Vec<u8>)>) -> io::Result<()> {
        while let Some((key, r)) = self.ready.remove(&self.next_out) {
            self.next_out += 1;
            out.push((key, r?));
        }
        Ok(())
    }
}

impl Drop for DeflatePool {
    fn drop(&mut self) {
        self.jobs = None;
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tag(key: u64, data: &[u8]) -> io::Result<Vec<u8>> {
        // Uneven work so that results come back out of order.
        std::thread::sleep(std::time::Duration::from_micros((key * 7919) % 500));
        let mut v = key.to_le_bytes().to_vec();
        v.extend_from_slice(data);
        Ok(v)
    }

    #[test]
    fn results_come_back_in_input_order() {
        let mut p = DeflatePool::new(4, tag);
        let mut got = Vec::new();
        for k in 0..500u64 {
            got.extend(p.submit(k * 3, vec![k as u8; 3]).unwrap());
            assert!(k + 1 - got.len() as u64 <= p.window() as u64 + 1);
        }
        got.extend(p.drain().unwrap());
        assert_eq!(got.len(), 500);
        for (i, (key, v)) in got.iter().enumerate() {
            assert_eq!(*key, i as u64 * 3);
            assert_eq!(&v[..8], &key.to_le_bytes());
        }
    }
}
