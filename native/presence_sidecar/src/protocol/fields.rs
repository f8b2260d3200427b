//! Fields of a frame: fixed-size big-endian integers, `str` (a `u32`
//! length and the bytes), lists of refs, and the rest of a frame.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use super::FrameError;

/// Reads fields off a frame, refusing (never panicking on) short input.
pub struct Reader {
    buf: Bytes,
}

impl Reader {
    pub fn new(buf: Bytes) -> Self {
        Reader { buf }
    }

    fn need(&self, n: usize) -> Result<(), FrameError> {
        if self.buf.remaining() < n {
            Err(FrameError::Truncated)
        } else {
            Ok(())
        }
    }

    pub fn u8(&mut self) -> Result<u8, FrameError> {
        self.need(1)?;
        Ok(self.buf.get_u8())
    }

    pub fn u16(&mut self) -> Result<u16, FrameError> {
        self.need(2)?;
        Ok(self.buf.get_u16())
    }

    pub fn u32(&mut self) -> Result<u32, FrameError> {
        self.need(4)?;
        Ok(self.buf.get_u32())
    }

    pub fn u64(&mut self) -> Result<u64, FrameError> {
        self.need(8)?;
        Ok(self.buf.get_u64())
    }

    pub fn bytes(&mut self, n: usize) -> Result<Bytes, FrameError> {
        self.need(n)?;
        Ok(self.buf.split_to(n))
    }

    pub fn str(&mut self) -> Result<Bytes, FrameError> {
        let len = self.u32()? as usize;
        self.bytes(len)
    }

    /// Everything left.
    pub fn rest(&mut self) -> Bytes {
        self.buf.split_off(0)
    }

    pub fn finish(&self) -> Result<(), FrameError> {
        match self.buf.remaining() {
            0 => Ok(()),
            n => Err(FrameError::Trailing(n)),
        }
    }

    /// A count of entries that each take at least `min_size` bytes: a
    /// garbage count cannot make us reserve more than the frame could hold.
    pub(super) fn count(&mut self, min_size: usize) -> Result<usize, FrameError> {
        let n = self.u32()? as usize;
        if n.saturating_mul(min_size) > self.buf.remaining() {
            return Err(FrameError::Truncated);
        }
        Ok(n)
    }
}

pub(super) fn put_refs(out: &mut BytesMut, refs: &[u64]) {
    out.put_u32(refs.len() as u32);
    for r in refs {
        out.put_u64(*r);
    }
}

pub(super) fn read_refs(r: &mut Reader) -> Result<Vec<u64>, FrameError> {
    let n = r.count(8)?;
    let mut refs = Vec::with_capacity(n);
    for _ in 0..n {
        refs.push(r.u64()?);
    }
    Ok(refs)
}

pub fn put_str(out: &mut BytesMut, bytes: &[u8]) {
    out.put_u32(bytes.len() as u32);
    out.put_slice(bytes);
}
