//! Read buffers of HTTP/1 connections, recycled per worker thread.
//!
//! Why: a held poll keeps no read buffer ([`super::Raw::release`] gives it
//! up once the head is parsed), so each request of a connection would
//! otherwise allocate one and free it again. A few are kept per thread
//! instead: at most [`KEPT`], so their memory is a constant, not a cost
//! per connection.

use bytes::BytesMut;
use std::cell::RefCell;

/// The size of a read buffer.
pub const SIZE: usize = 1024;

/// Most buffers kept per thread.
const KEPT: usize = 64;

thread_local! {
    static FREE: RefCell<Vec<BytesMut>> = const { RefCell::new(Vec::new()) };
}

/// An empty buffer of at least [`SIZE`] bytes: a recycled one when this
/// thread has one.
pub fn take() -> BytesMut {
    FREE.with(|free| free.borrow_mut().pop())
        .unwrap_or_else(|| BytesMut::with_capacity(SIZE))
}

/// Gives back an empty buffer. Kept when it has room for [`SIZE`] bytes
/// from its start and is not much larger, and this thread keeps fewer than
/// [`KEPT`]; freed otherwise.
pub fn give(mut buf: BytesMut) {
    debug_assert!(buf.is_empty());
    if buf.capacity() > 4 * SIZE || !buf.try_reclaim(SIZE) {
        return;
    }
    FREE.with(|free| {
        let mut free = free.borrow_mut();
        if free.len() < KEPT {
            free.push(buf);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_buffer_given_back_is_taken_again_with_room_from_its_start() {
        let mut buf = take();
        buf.extend_from_slice(b"GET / HTTP/1.1\r\n\r\n");
        let at = buf.as_ptr();
        bytes::Buf::advance(&mut buf, 18);
        give(buf);
        let again = take();
        assert_eq!(again.as_ptr(), at, "the same allocation, from its start");
        assert!(again.is_empty() && again.capacity() >= SIZE);
        // A large one is not kept.
        give(BytesMut::with_capacity(64 * SIZE));
        assert!(take().capacity() < 64 * SIZE);
    }
}
