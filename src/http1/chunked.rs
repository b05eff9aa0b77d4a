//! Where a chunked request body ends ([`ChunkedEnd`]), found as its bytes
//! stream past, so that a request with `Transfer-Encoding: chunked` can be
//! followed by another on the same connection (see [`super::gate::Gate`]).
//! Only the framing is read (chunk sizes with httparse, as Pingora does;
//! data skipped; trailer lines up to the blank one): the body itself is
//! Pingora's to decode.

/// Longest chunk-size line (with its extensions) or trailer line.
const MAX_LINE: usize = 4096;

/// A scan of a chunked body, fed its bytes in order.
#[derive(Debug, Default)]
pub(super) struct ChunkedEnd {
    state: State,
    /// The start of the current line, up to `MAX_LINE` bytes.
    line: Vec<u8>,
}

#[derive(Debug, Default, PartialEq)]
enum State {
    /// Reading a chunk-size line.
    #[default]
    Size,
    /// Skipping this many bytes of chunk data.
    Data(u64),
    /// Skipping the line end after a chunk's data.
    DataEnd,
    /// Reading trailer lines (after the last, empty chunk).
    Trailer,
}

/// The bytes given are not a chunked body: where it ends cannot be told.
#[derive(Debug, PartialEq)]
pub(super) struct Malformed;

impl ChunkedEnd {
    /// Reads `bytes`, the next bytes of the body. Ok(Some(n)): the body ends
    /// after the first `n` of them (what follows is the next request);
    /// Ok(None): it goes on past them.
    pub(super) fn feed(&mut self, bytes: &[u8]) -> Result<Option<usize>, Malformed> {
        let mut at = 0;
        while at < bytes.len() {
            match self.state {
                State::Data(left) => {
                    let here = (bytes.len() - at).min(usize::try_from(left).unwrap_or(usize::MAX));
                    at += here;
                    self.state = match left - here as u64 {
                        0 => State::DataEnd,
                        left => State::Data(left),
                    };
                }
                State::Size | State::DataEnd | State::Trailer => {
                    let Some(end) = memchr::memchr(b'\n', &bytes[at..]) else {
                        self.take(&bytes[at..])?;
                        return Ok(None);
                    };
                    self.take(&bytes[at..at + end + 1])?;
                    at += end + 1;
                    if self.line_done()? {
                        return Ok(Some(at));
                    }
                }
            }
        }
        Ok(None)
    }

    /// Adds `part` to the current line.
    fn take(&mut self, part: &[u8]) -> Result<(), Malformed> {
        if self.line.len() + part.len() > MAX_LINE {
            return Err(Malformed);
        }
        self.line.extend_from_slice(part);
        Ok(())
    }

    /// The current line is whole: moves on. True when it ended the body.
    fn line_done(&mut self) -> Result<bool, Malformed> {
        let line = std::mem::take(&mut self.line);
        let blank = matches!(line.as_slice(), b"\r\n" | b"\n");
        match self.state {
            State::Size => match httparse::parse_chunk_size(&line) {
                Ok(httparse::Status::Complete((_, 0))) => self.state = State::Trailer,
                Ok(httparse::Status::Complete((_, size))) => self.state = State::Data(size),
                _ => return Err(Malformed),
            },
            State::DataEnd if blank => self.state = State::Size,
            State::DataEnd => return Err(Malformed),
            State::Trailer => return Ok(blank),
            State::Data(_) => unreachable!("data is skipped, not read as lines"),
        }
        Ok(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const BODY: &[u8] = b"5\r\nthree\r\na;ext=1\r\n0123456789\r\n0\r\nX-Sum: 1\r\n\r\n";

    #[test]
    fn finds_the_end_of_a_body_with_extensions_and_trailers() {
        let mut with_next = BODY.to_vec();
        with_next.extend_from_slice(b"GET / HTTP/1.1\r\n\r\n");
        assert_eq!(ChunkedEnd::default().feed(&with_next), Ok(Some(BODY.len())));
        let plain = b"0\r\n\r\nGET";
        assert_eq!(ChunkedEnd::default().feed(plain), Ok(Some(5)));
    }

    #[test]
    fn refuses_what_is_not_chunked() {
        assert_eq!(ChunkedEnd::default().feed(b"zz\r\n"), Err(Malformed));
        assert_eq!(ChunkedEnd::default().feed(b"1\r\nab\r\n"), Err(Malformed));
        let long = vec![b'1'; MAX_LINE + 1];
        assert_eq!(ChunkedEnd::default().feed(&long), Err(Malformed));
    }

    proptest! {
        /// However the body is cut into reads, its end is found at the
        /// same byte.
        #[test]
        fn the_end_does_not_depend_on_how_the_bytes_arrive(cuts in proptest::collection::vec(0..BODY.len(), 0..8)) {
            let mut cuts = cuts;
            cuts.push(BODY.len());
            cuts.sort_unstable();
            let mut scan = ChunkedEnd::default();
            let (mut from, mut end) = (0, None);
            for cut in cuts {
                if let Some(n) = scan.feed(&BODY[from..cut]).unwrap() {
                    end = Some(from + n);
                    break;
                }
                from = cut;
            }
            prop_assert_eq!(end, Some(BODY.len()));
        }
    }
}
