//! One virtio-block request (virtio 1.2, 5.2.6): a descriptor chain holding a header, data
//! buffers and a status byte. The whole chain is checked against the disk and guest memory
//! before any byte moves; what fails a check completes with an error status, and a chain without
//! a status byte returns unanswered.

use std::io;

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::DescriptorChain;
use vm_memory::{
    Bytes, GuestMemoryBackend, GuestMemoryError, GuestMemoryMmap, VolatileMemoryError,
};

use super::image::{Disk, DiskCounters};
use super::{SECTOR_SIZE, SEG_MAX, SERIAL_LEN};

/// Every request chain has at most this many descriptors; anything longer is refused unread.
pub(super) const MAX_REQUEST_DESCRIPTORS: usize = SEG_MAX as usize + 2;
/// `struct virtio_blk_outhdr`: type (le32), reserved (le32), sector (le64).
const REQUEST_HEADER_LEN: usize = 16;
/// `struct virtio_blk_discard_write_zeroes`: sector (le64), num_sectors (le32), flags (le32).
const DISCARD_SEGMENT_LEN: usize = 16;

/// Why one request fails; the guest sees only the status byte.
#[derive(Debug, thiserror::Error)]
pub(super) enum RequestError {
    #[error("chain of {0} descriptors, more than seg_max allows")]
    ChainTooLong(usize),
    #[error("no request header")]
    MissingHeader,
    #[error("header descriptor of {len} bytes (device-writable: {writable})")]
    BadHeader { len: u32, writable: bool },
    #[error("{0} data segments, more than seg_max")]
    TooManySegments(usize),
    #[error("a data descriptor has the wrong direction for this request")]
    DataDirection,
    #[error("a data buffer at {addr:#x} of {len} bytes is outside guest memory")]
    DataOutsideMemory { addr: u64, len: u32 },
    #[error("data length {0} is not a whole number of sectors")]
    UnalignedLength(u64),
    #[error("{len} bytes at sector {sector} fall outside the disk")]
    OutOfRange { sector: u64, len: u64 },
    #[error("the request needs a data buffer")]
    MissingData,
    #[error("{0} bytes of discard/write-zeroes segments (one 16-byte segment is allowed)")]
    BadSegments(u64),
    #[error("discard/write-zeroes flags {0:#x} are not supported")]
    UnsupportedFlags(u32),
    #[error("the disk is read-only")]
    ReadOnly,
    #[error("request type {0} is not supported")]
    UnsupportedType(u32),
    #[error("cannot access guest memory")]
    GuestMemory(#[source] GuestMemoryError),
    #[error("image I/O failed")]
    ImageTransfer(#[source] VolatileMemoryError),
    #[error("image I/O failed")]
    Image(#[source] io::Error),
}

impl RequestError {
    /// The status byte the guest gets (virtio 1.2, 5.2.6).
    fn status(&self) -> u8 {
        let status = match self {
            Self::UnsupportedType(_) | Self::UnsupportedFlags(_) => VIRTIO_BLK_S_UNSUPP,
            _ => VIRTIO_BLK_S_IOERR,
        };
        status as u8
    }

    /// Errors of the host, worth a warning; the others are the guest's own doing, and a guest
    /// could flood the log with them.
    fn is_host_failure(&self) -> bool {
        matches!(self, Self::ImageTransfer(_) | Self::Image(_))
    }
}

/// Serves one request chain; returns the used length (bytes written into the chain).
///
/// The chain must end with a device-writable status byte in guest memory; without one the
/// guest cannot be told anything, so the request is not executed and returns with length 0.
pub(super) fn serve(
    disk: &Disk,
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
    writeback: bool,
) -> u32 {
    let head = chain.head_index();
    let mut descriptors = Vec::with_capacity(4);
    let mut count = 0usize;
    let mut last = None;
    // The iterator ends after at most a queue's (or an indirect table's) worth of
    // descriptors, so a looping chain cannot hold us here.
    for descriptor in chain {
        if descriptors.len() < MAX_REQUEST_DESCRIPTORS {
            descriptors.push(descriptor);
        }
        count += 1;
        last = Some(descriptor);
    }
    let Some(status) = last.filter(|status| {
        status.is_write_only() && status.len() >= 1 && mem.address_in_range(status.addr())
    }) else {
        log::debug!("virtio-block: request {head} has no writable status byte; dropped");
        return 0;
    };
    let outcome = match descriptors.get(..count - 1) {
        Some(body) if count <= MAX_REQUEST_DESCRIPTORS => Request::parse(disk, mem, body)
            .and_then(|request| request.execute(disk, mem, writeback)),
        _ => Err(RequestError::ChainTooLong(count)),
    };
    DiskCounters::add(&disk.counters.requests, 1);
    let (status_byte, data_len) = match outcome {
        Ok(data_len) => (VIRTIO_BLK_S_OK as u8, data_len),
        Err(e) => {
            DiskCounters::add(&disk.counters.errors, 1);
            if e.is_host_failure() {
                log::warn!("virtio-block: {}: {e}", disk.path.display());
            } else {
                log::debug!("virtio-block: request {head} refused: {e}");
            }
            // Whatever was already copied is not reported: a device may write more than
            // the used length says (virtio 1.2, 2.7.8.2).
            (e.status(), 0)
        }
    };
    if let Err(e) = mem.write_obj(status_byte, status.addr()) {
        log::debug!("virtio-block: cannot write the status of request {head}: {e}");
        return 0;
    }
    data_len.saturating_add(1)
}

/// A request checked against the disk and guest memory, ready to run.
enum Request<'c> {
    /// Copy the image from `offset` into `buffers`.
    In {
        offset: u64,
        buffers: &'c [Descriptor],
    },
    /// Copy `buffers` into the image from `offset`.
    Out {
        offset: u64,
        buffers: &'c [Descriptor],
    },
    Flush,
    /// The serial into `buffers`, as much of it as they hold.
    GetId {
        buffers: &'c [Descriptor],
    },
    Discard {
        offset: u64,
        len: u64,
    },
    WriteZeroes {
        offset: u64,
        len: u64,
        unmap: bool,
    },
}

/// What a discard or write-zeroes request asks of the image.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Erase {
    Discard,
    WriteZeroes,
}

impl<'c> Request<'c> {
    /// Parses and checks a request given its descriptors without the status one.
    fn parse(
        disk: &Disk,
        mem: &GuestMemoryMmap,
        body: &'c [Descriptor],
    ) -> Result<Self, RequestError> {
        let (header, data) = body.split_first().ok_or(RequestError::MissingHeader)?;
        if header.is_write_only() || (header.len() as usize) < REQUEST_HEADER_LEN {
            return Err(RequestError::BadHeader {
                len: header.len(),
                writable: header.is_write_only(),
            });
        }
        let mut raw = [0; REQUEST_HEADER_LEN];
        mem.read_slice(&mut raw, header.addr())
            .map_err(RequestError::GuestMemory)?;
        let [t0, t1, t2, t3, _, _, _, _, s0, s1, s2, s3, s4, s5, s6, s7] = raw;
        let request_type = u32::from_le_bytes([t0, t1, t2, t3]);
        let sector = u64::from_le_bytes([s0, s1, s2, s3, s4, s5, s6, s7]);
        match request_type {
            VIRTIO_BLK_T_IN => Ok(Self::In {
                offset: data_extent(disk, mem, sector, data, true)?,
                buffers: data,
            }),
            VIRTIO_BLK_T_OUT => {
                ensure_writable(disk)?;
                Ok(Self::Out {
                    offset: data_extent(disk, mem, sector, data, false)?,
                    buffers: data,
                })
            }
            VIRTIO_BLK_T_FLUSH => Ok(Self::Flush),
            VIRTIO_BLK_T_GET_ID => {
                if data.is_empty() {
                    return Err(RequestError::MissingData);
                }
                if data.iter().any(|buffer| !buffer.is_write_only()) {
                    return Err(RequestError::DataDirection);
                }
                Ok(Self::GetId { buffers: data })
            }
            VIRTIO_BLK_T_DISCARD => parse_erase(disk, mem, data, Erase::Discard),
            VIRTIO_BLK_T_WRITE_ZEROES => parse_erase(disk, mem, data, Erase::WriteZeroes),
            other => Err(RequestError::UnsupportedType(other)),
        }
    }

    /// Runs the request; returns how many bytes it wrote into guest buffers.
    fn execute(
        self,
        disk: &Disk,
        mem: &GuestMemoryMmap,
        writeback: bool,
    ) -> Result<u32, RequestError> {
        match self {
            Self::In { offset, buffers } => {
                let read = disk.read_into(mem, offset, buffers)?;
                DiskCounters::add(&disk.counters.read_bytes, u64::from(read));
                Ok(read)
            }
            Self::Out { offset, buffers } => {
                disk.write_from(mem, offset, buffers)?;
                disk.write_through(writeback).map(|()| 0)
            }
            // Writes are durable once they reach the disk under the image: fdatasync, and only
            // then the completion.
            Self::Flush => disk.flush().map_err(RequestError::Image).map(|()| 0),
            Self::GetId { buffers } => get_id(&disk.serial, mem, buffers),
            // Nothing changes, so nothing to make durable either.
            Self::Discard { len: 0, .. } | Self::WriteZeroes { len: 0, .. } => Ok(0),
            Self::Discard { offset, len } => {
                disk.discard(offset, len).map_err(RequestError::Image)?;
                disk.write_through(writeback).map(|()| 0)
            }
            Self::WriteZeroes { offset, len, unmap } => {
                disk.write_zeroes(offset, len, unmap)
                    .map_err(RequestError::Image)?;
                disk.write_through(writeback).map(|()| 0)
            }
        }
    }
}

/// Refuses a request that would change a read-only disk.
fn ensure_writable(disk: &Disk) -> Result<(), RequestError> {
    if disk.read_only {
        return Err(RequestError::ReadOnly);
    }
    Ok(())
}

/// Checks the data buffers of an IN (`device_writes`) or OUT request and returns the image
/// offset they start at. Nothing is copied unless the whole request is valid.
fn data_extent(
    disk: &Disk,
    mem: &GuestMemoryMmap,
    sector: u64,
    data: &[Descriptor],
    device_writes: bool,
) -> Result<u64, RequestError> {
    if data.len() > SEG_MAX as usize {
        return Err(RequestError::TooManySegments(data.len()));
    }
    let mut len = 0u64;
    for buffer in data {
        if buffer.is_write_only() != device_writes {
            return Err(RequestError::DataDirection);
        }
        if !mem.check_range(buffer.addr(), buffer.len() as usize) {
            return Err(RequestError::DataOutsideMemory {
                addr: buffer.addr().0,
                len: buffer.len(),
            });
        }
        // At most SEG_MAX u32 lengths: no overflow.
        len += u64::from(buffer.len());
    }
    if !len.is_multiple_of(SECTOR_SIZE) {
        return Err(RequestError::UnalignedLength(len));
    }
    byte_offset(disk, sector, len)
}

/// The image offset of `len` bytes at `sector`, if they are all inside the disk.
fn byte_offset(disk: &Disk, sector: u64, len: u64) -> Result<u64, RequestError> {
    sector
        .checked_mul(SECTOR_SIZE)
        .filter(|offset| offset.checked_add(len).is_some_and(|end| end <= disk.size))
        .ok_or(RequestError::OutOfRange { sector, len })
}

/// DISCARD and WRITE_ZEROES: one segment, whose sectors afterwards read as zeros.
fn parse_erase(
    disk: &Disk,
    mem: &GuestMemoryMmap,
    data: &[Descriptor],
    request: Erase,
) -> Result<Request<'static>, RequestError> {
    ensure_writable(disk)?;
    let [s0, s1, s2, s3, s4, s5, s6, s7, n0, n1, n2, n3, f0, f1, f2, f3] = read_segment(mem, data)?;
    let sector = u64::from_le_bytes([s0, s1, s2, s3, s4, s5, s6, s7]);
    let num_sectors = u32::from_le_bytes([n0, n1, n2, n3]);
    let flags = u32::from_le_bytes([f0, f1, f2, f3]);
    let unmap = flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0;
    // Virtio 1.2, 5.2.6.2: unknown flags, and the unmap flag on a discard, are UNSUPP.
    if flags & !VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0 || (request == Erase::Discard && unmap) {
        return Err(RequestError::UnsupportedFlags(flags));
    }
    // A u32 count of sectors is below 2^41 bytes: no overflow.
    let len = u64::from(num_sectors) * SECTOR_SIZE;
    let offset = byte_offset(disk, sector, len)?;
    Ok(match request {
        Erase::Discard => Request::Discard { offset, len },
        Erase::WriteZeroes => Request::WriteZeroes { offset, len, unmap },
    })
}

/// Reads the one `virtio_blk_discard_write_zeroes` segment of a discard or write-zeroes
/// request, which may be split over several device-readable buffers.
fn read_segment(
    mem: &GuestMemoryMmap,
    data: &[Descriptor],
) -> Result<[u8; DISCARD_SEGMENT_LEN], RequestError> {
    if data.iter().any(Descriptor::is_write_only) {
        return Err(RequestError::DataDirection);
    }
    let len: u64 = data.iter().map(|buffer| u64::from(buffer.len())).sum();
    // Exactly max_discard_seg (= max_write_zeroes_seg = 1) segment.
    if len != DISCARD_SEGMENT_LEN as u64 {
        return Err(RequestError::BadSegments(len));
    }
    let mut segment = [0; DISCARD_SEGMENT_LEN];
    let mut filled = 0;
    for buffer in data {
        // `len` above bounds the buffers to the segment's size in total.
        let part = (buffer.len() as usize).min(DISCARD_SEGMENT_LEN - filled);
        mem.read_slice(&mut segment[filled..filled + part], buffer.addr())
            .map_err(RequestError::GuestMemory)?;
        filled += part;
    }
    Ok(segment)
}

/// GET_ID: `serial` into the guest's buffers, as much of it as they hold.
fn get_id(
    serial: &[u8; SERIAL_LEN],
    mem: &GuestMemoryMmap,
    buffers: &[Descriptor],
) -> Result<u32, RequestError> {
    let mut serial = &serial[..];
    for buffer in buffers {
        let (part, rest) = serial.split_at(serial.len().min(buffer.len() as usize));
        mem.write_slice(part, buffer.addr())
            .map_err(RequestError::GuestMemory)?;
        serial = rest;
    }
    // At most SERIAL_LEN.
    Ok((SERIAL_LEN - serial.len()) as u32)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::FileExt;

    use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use vm_memory::GuestAddress;

    use super::super::test_driver::*;
    use super::*;

    #[test]
    fn the_last_sector_is_readable_and_the_next_is_not() {
        let mem = guest_memory();
        let image = image(16);
        let mut driver = Driver::new(&mem, open(&image, false, None).unwrap());
        assert_eq!(driver.read(15, 512), (513, OK));
        assert_eq!(driver.read(15, 1024), (1, IOERR));
        assert_eq!(driver.read(16, 512), (1, IOERR));
        assert_eq!(driver.read(16, 0), (1, OK));
        assert_eq!(driver.read(u64::MAX, 512), (1, IOERR));
        // sector * 512 overflows u64.
        assert_eq!(driver.read(u64::MAX / 256, 512), (1, IOERR));
        assert_eq!(driver.write(1 << 55, &[1; 512]), (1, IOERR));
    }

    #[test]
    fn requests_and_bytes_are_counted() {
        let mem = guest_memory();
        let image = image(16);
        let mut driver = Driver::new(&mem, open(&image, false, None).unwrap());
        assert_eq!(driver.write(2, &[7; 1024]), (1, OK));
        assert_eq!(driver.read(2, 512), (513, OK));
        assert_eq!(driver.read(16, 512), (1, IOERR));
        let counters: std::collections::HashMap<_, _> =
            crate::virtio::VirtioDevice::counters(&driver.block)
                .into_iter()
                .collect();
        assert_eq!(counters["requests"], 3);
        assert_eq!(counters["request_errors"], 1);
        assert_eq!(counters["read_bytes"], 512);
        assert_eq!(counters["written_bytes"], 1024);
    }

    #[test]
    fn get_id_answers_the_configured_id() {
        let mem = guest_memory();
        let image = image(8);
        let mut driver = Driver::new(&mem, open(&image, false, Some("data-disk")).unwrap());
        let (len, status) = driver.request(VIRTIO_BLK_T_GET_ID, 0, &[writable(DATA, 20)]);
        assert_eq!((len, status), (21, OK));
        let mut expected = b"data-disk".to_vec();
        expected.resize(20, 0);
        assert_eq!(driver.guest_bytes(DATA, 20), expected);

        // A buffer shorter than 20 bytes gets what fits, and nothing beyond it.
        driver
            .mem
            .write_slice(&[0xaa; 32], GuestAddress(DATA))
            .unwrap();
        let (len, status) = driver.request(VIRTIO_BLK_T_GET_ID, 0, &[writable(DATA, 4)]);
        assert_eq!((len, status), (5, OK));
        assert_eq!(driver.guest_bytes(DATA, 5), b"data\xaa");
    }

    #[test]
    fn unknown_request_types_are_unsupported() {
        let mem = guest_memory();
        let image = image(8);
        let mut driver = Driver::new(&mem, open(&image, false, None).unwrap());
        for request_type in [2, 3, 14, 15, 0x8000_0000, u32::MAX] {
            let result = driver.request(request_type, 0, &[writable(DATA, 512)]);
            assert_eq!(result, (1, UNSUPP), "type {request_type}");
        }
    }

    #[test]
    fn erase_flags_the_spec_forbids_are_unsupported() {
        let mem = guest_memory();
        let image = image(64);
        let mut driver = Driver::new(&mem, open(&image, false, None).unwrap());
        assert_eq!(driver.write(0, &[0x77; 512]), (1, OK));
        let unmap = VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP;
        assert_eq!(driver.erase(VIRTIO_BLK_T_DISCARD, 0, 1, unmap), UNSUPP);
        assert_eq!(driver.erase(VIRTIO_BLK_T_WRITE_ZEROES, 0, 1, 2), UNSUPP);
        assert_eq!(
            driver.erase(VIRTIO_BLK_T_DISCARD, 0, 1, 0x8000_0000),
            UNSUPP
        );
        assert_eq!(image_bytes(&image, 0, 512), vec![0x77; 512]);
    }

    #[test]
    fn erase_segments_must_be_exactly_one() {
        let mem = guest_memory();
        let image = image(64);
        let mut driver = Driver::new(&mem, open(&image, false, None).unwrap());
        assert_eq!(driver.write(0, &[0x77; 512]), (1, OK));
        let mut segment = [0; 16];
        segment[8] = 1; // sector 0, one sector
        driver
            .mem
            .write_slice(&segment, GuestAddress(SEGMENT))
            .unwrap();
        driver
            .mem
            .write_slice(&segment, GuestAddress(SEGMENT + 16))
            .unwrap();
        for data in [
            vec![readable(SEGMENT, 32)],                             // two segments
            vec![readable(SEGMENT, 8)],                              // half a segment
            vec![],                                                  // none
            vec![writable(SEGMENT, 16)],                             // wrong direction
            vec![readable(MEM_SIZE as u64 - 8, 16)],                 // outside memory
            vec![readable(SEGMENT, 16), readable(SEGMENT + 16, 16)], // two in two buffers
        ] {
            for request_type in [VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES] {
                let result = driver.request(request_type, 0, &data);
                assert_eq!(result, (1, IOERR), "{request_type} {data:?}");
            }
        }
        assert_eq!(image_bytes(&image, 0, 512), vec![0x77; 512]);
        // One segment split over two buffers is fine.
        let split = [readable(SEGMENT, 5), readable(SEGMENT + 5, 11)];
        assert_eq!(driver.request(VIRTIO_BLK_T_DISCARD, 0, &split), (1, OK));
        assert_eq!(image_bytes(&image, 0, 512), vec![0; 512]);
    }

    #[test]
    fn malformed_headers_are_io_errors() {
        let mem = guest_memory();
        let image = image(8);
        image.as_file().write_all_at(&[0x42; 512], 0).unwrap();
        let mut driver = Driver::new(&mem, open(&image, false, None).unwrap());
        driver.write_header(VIRTIO_BLK_T_IN, 0);
        let status = writable(STATUS, 1);
        let data = writable(DATA, 512);
        for chain in [
            vec![writable(HEADER, 16), data, status], // header device-writable
            vec![readable(HEADER, 15), data, status], // header too short
            vec![readable(MEM_SIZE as u64 - 8, 16), data, status], // header beyond RAM
            vec![readable(u64::MAX - 7, 16), data, status], // header address wraps
            vec![status],                             // no header at all
        ] {
            assert_eq!(driver.submit(&chain), (1, IOERR), "{chain:?}");
        }
        assert_eq!(driver.guest_bytes(DATA, 512), vec![0; 512]);
    }

    #[test]
    fn malformed_data_buffers_are_io_errors() {
        let mem = guest_memory();
        let image = image(8);
        image.as_file().write_all_at(&[0x42; 4096], 0).unwrap();
        let mut driver = Driver::new(&mem, open(&image, false, None).unwrap());
        for (request_type, data) in [
            // IN into a device-readable buffer, OUT from a device-writable one.
            (VIRTIO_BLK_T_IN, vec![readable(DATA, 512)]),
            (
                VIRTIO_BLK_T_IN,
                vec![writable(DATA, 512), readable(DATA + 512, 512)],
            ),
            (VIRTIO_BLK_T_OUT, vec![writable(DATA, 512)]),
            // Not whole sectors.
            (VIRTIO_BLK_T_IN, vec![writable(DATA, 511)]),
            (VIRTIO_BLK_T_OUT, vec![readable(DATA, 513)]),
            (
                VIRTIO_BLK_T_IN,
                vec![writable(DATA, 256), writable(DATA + 512, 512)],
            ),
            // Outside guest memory, straddling its end, wrapping around the address space.
            (VIRTIO_BLK_T_IN, vec![writable(MEM_SIZE as u64, 512)]),
            (VIRTIO_BLK_T_IN, vec![writable(MEM_SIZE as u64 - 256, 512)]),
            (VIRTIO_BLK_T_OUT, vec![readable(MEM_SIZE as u64 - 256, 512)]),
            (VIRTIO_BLK_T_IN, vec![writable(u64::MAX - 255, 512)]),
            (VIRTIO_BLK_T_OUT, vec![readable(1 << 40, u32::MAX - 511)]),
            // GET_ID with nowhere to write, or into a device-readable buffer.
            (VIRTIO_BLK_T_GET_ID, vec![]),
            (VIRTIO_BLK_T_GET_ID, vec![readable(DATA, 20)]),
        ] {
            let result = driver.request(request_type, 0, &data);
            assert_eq!(result, (1, IOERR), "type {request_type} {data:?}");
        }
        assert_eq!(image_bytes(&image, 0, 4096), vec![0x42; 4096]);
        assert_eq!(driver.guest_bytes(DATA, 1024), vec![0; 1024]);
        let tail = driver.guest_bytes(MEM_SIZE as u64 - 256, 256);
        assert_eq!(tail, vec![0; 256]);
    }

    #[test]
    fn requests_without_a_status_byte_return_unanswered() {
        let mem = guest_memory();
        let image = image(8);
        let mut driver = Driver::new(&mem, open(&image, false, None).unwrap());
        driver.write_header(VIRTIO_BLK_T_OUT, 0);
        driver
            .mem
            .write_slice(&[0x33; 512], GuestAddress(DATA))
            .unwrap();
        let header = readable(HEADER, 16);
        let data = readable(DATA, 512);
        for chain in [
            vec![header, data, readable(STATUS, 1)], // status device-readable
            vec![header, data, writable(STATUS, 0)], // status of length 0
            vec![header, data, writable(MEM_SIZE as u64, 1)], // status beyond RAM
            vec![header, data],                      // no status descriptor
            vec![header],
        ] {
            let (len, status) = driver.submit(&chain);
            assert_eq!((len, status), (0, NO_STATUS), "{chain:?}");
        }
        // None of those writes was executed.
        assert_eq!(image_bytes(&image, 0, 512), vec![0; 512]);
        assert!(driver.interrupted());
    }

    #[test]
    fn more_than_seg_max_segments_is_an_io_error() {
        let mem = guest_memory();
        let image = image(256);
        let mut driver = Driver::new(&mem, open(&image, false, None).unwrap());
        let segments = |count: u64| -> Vec<Buf> {
            (0..count).map(|i| writable(DATA + i * 512, 512)).collect()
        };
        let at_limit = driver.request(VIRTIO_BLK_T_IN, 0, &segments(u64::from(SEG_MAX)));
        assert_eq!(at_limit, (SEG_MAX * 512 + 1, OK));
        let over = driver.request(VIRTIO_BLK_T_IN, 0, &segments(u64::from(SEG_MAX) + 1));
        assert_eq!(over, (1, IOERR));
        let way_over = driver.request(VIRTIO_BLK_T_IN, 0, &segments(250));
        assert_eq!(way_over, (1, IOERR));
    }

    #[test]
    fn looping_chains_end() {
        let mem = guest_memory();
        let image = image(8);
        let mut driver = Driver::new(&mem, open(&image, false, None).unwrap());
        let next = VRING_DESC_F_NEXT as u16;
        let write = VRING_DESC_F_WRITE as u16;
        // A descriptor that is its own successor: the walk stops after a queue's worth.
        driver
            .mem
            .write_obj(NO_STATUS, GuestAddress(STATUS))
            .unwrap();
        driver.write_descriptor(7, Descriptor::new(STATUS, 1, next | write, 7));
        driver.offer(7);
        // Two descriptors pointing at each other, the header readable.
        driver.write_header(VIRTIO_BLK_T_IN, 0);
        driver.write_descriptor(8, Descriptor::new(HEADER, 16, next, 9));
        driver.write_descriptor(9, Descriptor::new(HEADER, 16, next, 8));
        driver.offer(8);
        // A `next` index outside the table.
        driver.write_descriptor(10, Descriptor::new(HEADER, 16, next, 999));
        driver.offer(10);
        driver.process();
        assert_eq!(driver.used_idx(), 3);
        // The self-loop ends on a writable byte: it gets IOERR for being too long.
        assert_eq!(driver.used(0), (7, 1));
        assert_eq!(driver.status(), IOERR);
        assert_eq!(driver.used(1), (8, 0));
        assert_eq!(driver.used(2), (10, 0));
    }
}
