//! Splitting a byte stream into JSON values without a delimiter.
//!
//! Both front ends read a stream of JSON values: SPDK's clients send one value after
//! another with no newline, QEMU's send one per line, and neither may be trusted to send
//! well-formed JSON. [`Splitter`] finds where each top-level value ends the way QEMU's
//! JSON streamer does, by counting braces and brackets outside strings, so that
//!
//! - a complete value is handed to serde exactly once (re-parsing a growing buffer on
//!   every read would be quadratic in the size of a large message);
//! - a malformed value (`{"a" 1}`) still has an end, so the connection resynchronizes
//!   after the error and the next request is served;
//! - a value larger than the limit is reported as soon as the limit is crossed, and its
//!   bytes are skipped rather than buffered until it ends.
//!
//! A top-level value that is not an object or array (`42`, `"x"`, `garbage`) ends at
//! the next whitespace or structural character, or at end of input ([`Splitter::finish`]).

/// What [`Splitter::next_frame`] yields.
#[derive(Debug, PartialEq, Eq)]
pub enum Frame {
    /// The bytes of one top-level value (not necessarily valid JSON).
    Value(Vec<u8>),
    /// The value being read crossed the size limit; its remaining bytes are skipped.
    TooLarge,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Between values.
    Idle,
    /// Inside an object or array.
    Nested,
    /// A top-level string.
    String,
    /// A top-level scalar or garbage: up to the next delimiter.
    Bare,
}

/// Incremental splitter; see the module documentation.
#[derive(Debug)]
pub struct Splitter {
    buf: Vec<u8>,
    /// Start of the value being scanned (meaningless while `Idle`).
    start: usize,
    /// Next byte to scan.
    pos: usize,
    state: State,
    braces: i64,
    brackets: i64,
    in_string: bool,
    escaped: bool,
    /// The current value crossed the limit: its bytes are dropped as they are scanned.
    skipping: bool,
    limit: usize,
}

fn is_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r')
}

fn is_delimiter(b: u8) -> bool {
    is_space(b) || matches!(b, b'{' | b'}' | b'[' | b']' | b'"' | b':' | b',')
}

impl Splitter {
    /// A splitter that reports values longer than `limit` bytes as [`Frame::TooLarge`].
    pub fn new(limit: usize) -> Splitter {
        Splitter {
            buf: Vec::new(),
            start: 0,
            pos: 0,
            state: State::Idle,
            braces: 0,
            brackets: 0,
            in_string: false,
            escaped: false,
            skipping: false,
            limit,
        }
    }

    /// Appends bytes read from the stream.
    pub fn feed(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// True if bytes of an unfinished value are buffered (or being skipped).
    pub fn has_partial(&self) -> bool {
        self.state != State::Idle || self.skipping
    }

    /// The next complete value, or `None` until more bytes arrive.
    pub fn next_frame(&mut self) -> Option<Frame> {
        while self.pos < self.buf.len() {
            let b = self.buf[self.pos];
            match self.state {
                State::Idle => {
                    if is_space(b) {
                        self.pos += 1;
                        continue;
                    }
                    self.start = self.pos;
                    self.pos += 1;
                    match b {
                        b'{' | b'[' | b'}' | b']' => {
                            self.state = State::Nested;
                            self.braces = 0;
                            self.brackets = 0;
                            self.in_string = false;
                            self.escaped = false;
                            if self.bracket(b)
                                && let Some(f) = self.complete()
                            {
                                return Some(f);
                            }
                        }
                        b'"' => {
                            self.state = State::String;
                            self.escaped = false;
                        }
                        _ => self.state = State::Bare,
                    }
                }
                State::Nested => {
                    self.pos += 1;
                    if self.in_string {
                        self.string_byte(b);
                    } else if b == b'"' {
                        self.in_string = true;
                    } else if self.bracket(b)
                        && let Some(f) = self.complete()
                    {
                        return Some(f);
                    }
                }
                State::String => {
                    self.pos += 1;
                    if self.string_byte(b)
                        && let Some(f) = self.complete()
                    {
                        return Some(f);
                    }
                }
                State::Bare => {
                    if is_delimiter(b) {
                        if let Some(f) = self.complete() {
                            return Some(f);
                        }
                        continue;
                    }
                    self.pos += 1;
                }
            }
            if let Some(f) = self.check_limit() {
                return Some(f);
            }
        }
        self.compact();
        None
    }

    /// End of input: a pending scalar is complete; a partial object, array or string
    /// is dropped (a truncated message is not answered).
    pub fn finish(&mut self) -> Option<Frame> {
        let frame = match self.state {
            State::Bare => self.complete(),
            _ => None,
        };
        self.buf.clear();
        self.start = 0;
        self.pos = 0;
        self.state = State::Idle;
        self.skipping = false;
        frame
    }

    /// Counts a structural byte inside a nested value; true if the value ends there.
    fn bracket(&mut self, b: u8) -> bool {
        match b {
            b'{' => self.braces += 1,
            b'}' => self.braces -= 1,
            b'[' => self.brackets += 1,
            b']' => self.brackets -= 1,
            _ => return false,
        }
        // Unbalanced closers end the value at once: serde reports the error.
        self.braces < 0 || self.brackets < 0 || (self.braces == 0 && self.brackets == 0)
    }

    /// Consumes one byte inside a string; true when it closes the string.
    fn string_byte(&mut self, b: u8) -> bool {
        if self.escaped {
            self.escaped = false;
        } else if b == b'\\' {
            self.escaped = true;
        } else if b == b'"' {
            self.in_string = false;
            return true;
        }
        false
    }

    /// The value `start..pos` is complete: its bytes, or nothing for the end of a value
    /// already reported as too large.
    fn complete(&mut self) -> Option<Frame> {
        self.state = State::Idle;
        if self.skipping {
            self.skipping = false;
            self.start = self.pos;
            return None;
        }
        let value = self.buf[self.start..self.pos].to_vec();
        self.start = self.pos;
        Some(Frame::Value(value))
    }

    fn check_limit(&mut self) -> Option<Frame> {
        if self.state == State::Idle || self.skipping || self.pos - self.start <= self.limit {
            return None;
        }
        self.skipping = true;
        self.buf.drain(..self.pos);
        self.pos = 0;
        self.start = 0;
        Some(Frame::TooLarge)
    }

    /// Drops consumed bytes (all scanned bytes of a value being skipped).
    fn compact(&mut self) {
        let keep_from = if self.state == State::Idle || self.skipping {
            self.pos
        } else {
            self.start
        };
        if keep_from > 0 {
            self.buf.drain(..keep_from);
            self.pos -= keep_from;
            self.start = self.start.saturating_sub(keep_from);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split_all(limit: usize, chunks: &[&[u8]]) -> Vec<Frame> {
        let mut s = Splitter::new(limit);
        let mut out = Vec::new();
        for c in chunks {
            s.feed(c);
            while let Some(f) = s.next_frame() {
                out.push(f);
            }
        }
        out.extend(s.finish());
        out
    }

    fn v(s: &str) -> Frame {
        Frame::Value(s.as_bytes().to_vec())
    }

    #[test]
    fn values_without_separators_are_split_at_their_closing_bracket() {
        let got = split_all(1 << 20, &[br#"{"a":1}[1,[2]]{"b":"}]"}"#]);
        assert_eq!(got, vec![v(r#"{"a":1}"#), v("[1,[2]]"), v(r#"{"b":"}]"}"#)]);
    }

    #[test]
    fn a_value_split_across_reads_comes_out_whole_once() {
        let got = split_all(
            1 << 20,
            &[b"  {\"a\": \"x\\", b"\"y\", ", b"\"b\": [1]}\n{}"],
        );
        assert_eq!(got, vec![v(r#"{"a": "x\"y", "b": [1]}"#), v("{}")]);
    }

    #[test]
    fn scalars_and_garbage_end_at_a_delimiter_or_at_end_of_input() {
        let got = split_all(1 << 20, &[b"42\n\"s\\\"t\" garbage{}\x00\xff\n7"]);
        assert_eq!(
            got,
            vec![
                v("42"),
                v(r#""s\"t""#),
                v("garbage"),
                v("{}"),
                Frame::Value(vec![0, 0xff]),
                v("7")
            ]
        );
    }

    #[test]
    fn malformed_values_still_end_so_the_stream_resynchronizes() {
        let got = split_all(1 << 20, &[br#"{"a" 1,,}]{"ok":1}"#]);
        assert_eq!(got, vec![v(r#"{"a" 1,,}"#), v("]"), v(r#"{"ok":1}"#)]);
    }

    #[test]
    fn an_oversized_value_is_reported_once_and_skipped_to_its_end() {
        let big = format!(r#"{{"pad":"{}"}}"#, "x".repeat(100));
        let got = split_all(
            16,
            &[
                &big.as_bytes()[..50],
                &big.as_bytes()[50..],
                br#" {"ok":1}"#,
            ],
        );
        assert_eq!(got, vec![Frame::TooLarge, v(r#"{"ok":1}"#)]);
    }

    #[test]
    fn a_truncated_object_at_end_of_input_is_dropped() {
        let got = split_all(1 << 20, &[br#"{"ok":1} {"jsonrpc":"2.0","par"#]);
        assert_eq!(got, vec![v(r#"{"ok":1}"#)]);
    }

    #[test]
    fn the_buffer_does_not_keep_consumed_bytes() {
        let mut s = Splitter::new(1 << 20);
        for _ in 0..1000 {
            s.feed(br#"{"a":1} {"b":"#);
            while s.next_frame().is_some() {}
            s.feed(b"2}");
            while s.next_frame().is_some() {}
        }
        assert!(s.buf.len() < 16, "{}", s.buf.len());
        assert!(!s.has_partial());
    }
}
