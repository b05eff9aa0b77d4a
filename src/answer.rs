//! Answers to a poll, encoded once and shared by every waiter they fit.
//!
//! An [`Answer`] is built from the subscription's cursor before the answer
//! and the messages it carries; it holds the cursor after them and the body
//! in the subscription's [`Format`], ready to write.

use crate::cursor::Cursor;
use crate::message::Message;
use crate::respond;
use bytes::Bytes;
use std::sync::{Arc, OnceLock};

/// Most messages one envelope answer carries.
pub const MAX_MESSAGES: usize = 100;

/// How a subscription wants its answers written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Format {
    /// The JSON envelope `{"cursor","gap","messages"}`.
    Envelope,
    /// One message per answer, its own bytes and content type.
    Raw,
    /// Server-Sent Events, `id:` and `data:` lines per message.
    Sse,
}

impl Format {
    /// Most messages one answer in this format carries.
    pub fn limit(self) -> usize {
        match self {
            Format::Raw => 1,
            Format::Envelope | Format::Sse => MAX_MESSAGES,
        }
    }
}

/// A ready-to-write answer.
#[derive(Debug)]
pub struct Answer {
    /// The format the body is in.
    pub format: Format,
    /// The cursor after the carried messages.
    pub cursor: Cursor,
    /// `cursor` as the client sees it.
    pub cursor_text: String,
    /// True when the client's position was lost (the `gap` of docs/api.md).
    pub gap: bool,
    /// The carried messages, oldest first.
    pub messages: Vec<Arc<Message>>,
    /// The body in the subscription's format (for `Raw`, the first message's
    /// bytes; empty when there is none).
    pub body: Bytes,
    /// The HTTP/1.1 status line and the answer's own header lines, encoded
    /// once for every waiter it is written to (see [`Answer::h1_head`]).
    h1_head: OnceLock<Vec<u8>>,
    /// The whole keep-alive HTTP/1.1 answer without added header fields
    /// (see [`Answer::h1_whole`]).
    h1_whole: OnceLock<Vec<u8>>,
}

impl Answer {
    /// Builds the answer for a client at `start` receiving `found`, each
    /// message paired with the index of its channel in the cursor.
    pub fn build(
        format: Format,
        start: &Cursor,
        gap: bool,
        found: &[(usize, Arc<Message>)],
    ) -> Answer {
        let mut cursor = start.clone();
        let mut body = Vec::new();
        let json_len: usize = found.iter().map(|(_, m)| m.json().len() + 1).sum();
        match format {
            Format::Envelope => body.reserve(json_len + 64),
            Format::Sse => body.reserve(json_len + found.len() * 48),
            Format::Raw => {}
        }
        if gap && format == Format::Sse {
            // SSE has no envelope: the lost position is its own event.
            body.extend_from_slice(b"event: gap\ndata: {\"gap\":true}\n\n");
        }
        // A loss notice among the messages moves the cursor past it and
        // makes the answer a gap; it is not sent.
        let mut gap = gap;
        let mut first = true;
        for (index, m) in found {
            cursor.0[*index] = m.id;
            if m.is_loss_notice() {
                gap = true;
                if format == Format::Sse {
                    body.extend_from_slice(b"id: ");
                    body.extend_from_slice(cursor.to_string().as_bytes());
                    body.extend_from_slice(b"\nevent: gap\ndata: {\"gap\":true}\n\n");
                }
                continue;
            }
            if format == Format::Sse {
                body.extend_from_slice(b"id: ");
                body.extend_from_slice(cursor.to_string().as_bytes());
                body.extend_from_slice(b"\ndata: ");
                body.extend_from_slice(m.json());
                body.extend_from_slice(b"\n\n");
            } else if format == Format::Envelope {
                if !first {
                    body.push(b',');
                }
                body.extend_from_slice(m.json());
            }
            first = false;
        }
        let messages: Vec<Arc<Message>> = found
            .iter()
            .filter(|(_, m)| !m.is_loss_notice())
            .map(|(_, m)| m.clone())
            .collect();
        let cursor_text = cursor.to_string();
        let body = match format {
            Format::Envelope => {
                let mut env = Vec::with_capacity(body.len() + cursor_text.len() + 48);
                env.extend_from_slice(b"{\"cursor\":\"");
                env.extend_from_slice(cursor_text.as_bytes());
                env.extend_from_slice(if gap {
                    b"\",\"gap\":true"
                } else {
                    b"\",\"gap\":false"
                });
                env.extend_from_slice(b",\"messages\":[");
                env.extend_from_slice(&body);
                env.extend_from_slice(b"]}");
                Bytes::from(env)
            }
            Format::Sse => Bytes::from(body),
            Format::Raw => messages.first().map(|m| m.data.clone()).unwrap_or_default(),
        };
        Answer {
            format,
            cursor,
            cursor_text,
            gap,
            messages,
            body,
            h1_head: OnceLock::new(),
            h1_whole: OnceLock::new(),
        }
    }

    /// The HTTP status of the answer: 204 for a raw answer without message.
    pub fn status(&self) -> u16 {
        match (self.format, self.messages.is_empty()) {
            (Format::Raw, true) => 204,
            _ => 200,
        }
    }

    /// The Content-Type of the answer ("" for none).
    pub fn content_type(&self) -> &str {
        match (self.format, self.messages.first()) {
            (Format::Raw, Some(m)) => m.content_type.as_str(),
            (Format::Raw, None) => "",
            (Format::Envelope, _) => "application/json",
            (Format::Sse, _) => "text/event-stream",
        }
    }

    /// The header fields every HTTP answer carries besides Content-Type and
    /// Content-Length: `Cache-Control`, `Pollgate-Cursor`, and `ETag` (raw)
    /// and `Pollgate-Gap` when they apply.
    pub fn fields(&self) -> impl Iterator<Item = (&'static str, String)> + '_ {
        let raw = self.format == Format::Raw;
        [
            Some(("Cache-Control", "no-store".to_string())),
            Some(("Pollgate-Cursor", self.cursor_text.clone())),
            raw.then(|| ("ETag", format!("\"{}\"", self.cursor_text))),
            self.gap.then(|| ("Pollgate-Gap", "1".to_string())),
        ]
        .into_iter()
        .flatten()
    }

    /// The HTTP/1.1 status line and header lines of the answer (each ending
    /// in CRLF, without the blank line), the same bytes for every waiter:
    /// encoded on first use.
    pub fn h1_head(&self) -> &[u8] {
        self.h1_head.get_or_init(|| {
            let mut head = Vec::with_capacity(160);
            let status = self.status();
            let reason = if status == 204 { "No Content" } else { "OK" };
            let content_type = self.content_type();
            respond::push_status_head(&mut head, (status, reason), content_type, self.body.len());
            for (name, value) in self.fields() {
                respond::push_field(&mut head, name, &value);
            }
            head
        })
    }

    /// The whole answer as `assemble` makes it from [`Answer::h1_head`],
    /// for the waiters that add nothing to it (keep-alive, no CORS fields):
    /// assembled by the first, the same bytes for the others (a publish's
    /// answers go out within moments, so its Date stays true).
    pub fn h1_whole(&self, assemble: impl FnOnce(&[u8]) -> Vec<u8>) -> &[u8] {
        self.h1_whole.get_or_init(|| assemble(self.h1_head()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::MessageId;

    fn msg(ch: &str, ms: u64, data: &'static str) -> Arc<Message> {
        Arc::new(Message::new(
            MessageId { ms, seq: 0 },
            ch.into(),
            "application/json".into(),
            Bytes::from_static(data.as_bytes()),
        ))
    }

    #[test]
    fn envelope_moves_each_channel_position() {
        let start = Cursor(smallvec::smallvec![MessageId::ZERO, MessageId::ZERO], None);
        let found = [(1, msg("b", 3, "1")), (0, msg("a", 4, "{\"x\":2}"))];
        let a = Answer::build(Format::Envelope, &start, false, &found);
        assert_eq!(a.cursor_text, "4-0.3-0");
        let v: serde_json::Value = serde_json::from_slice(&a.body).unwrap();
        assert_eq!(v["cursor"], "4-0.3-0");
        assert_eq!(v["gap"], false);
        assert_eq!(v["messages"][1]["data"]["x"], 2);
        assert_eq!(v["messages"][0]["channel"], "b");
    }

    #[test]
    fn a_loss_notice_is_a_gap_that_moves_the_cursor_and_is_not_sent() {
        let start = Cursor(smallvec::smallvec![MessageId::ZERO], None);
        let notice = Arc::new(Message::loss_notice(
            MessageId { ms: 2, seq: 0 },
            "a".into(),
        ));
        let found = [(0, msg("a", 1, "1")), (0, notice), (0, msg("a", 3, "3"))];
        let a = Answer::build(Format::Envelope, &start, false, &found);
        let v: serde_json::Value = serde_json::from_slice(&a.body).unwrap();
        assert_eq!(
            (v["gap"].as_bool(), v["cursor"].as_str()),
            (Some(true), Some("3-0"))
        );
        assert_eq!(v["messages"].as_array().unwrap().len(), 2, "{v}");
        assert_eq!(a.messages.len(), 2);
        // Raw, the notice alone: 204, a gap, the cursor past the notice.
        let a = Answer::build(Format::Raw, &start, false, &found[1..2]);
        assert_eq!(
            (a.status(), a.gap, a.cursor_text.as_str()),
            (204, true, "2-0")
        );
        // SSE: the gap is an event at the notice's place, with its position.
        let a = Answer::build(Format::Sse, &start, false, &found);
        let text = std::str::from_utf8(&a.body).unwrap();
        assert!(text.contains("id: 1-0\ndata: "), "{text}");
        assert!(text.contains("id: 2-0\nevent: gap\n"), "{text}");
        assert!(
            text.ends_with("\n\n") && text.contains("id: 3-0\ndata: "),
            "{text}"
        );
    }

    #[test]
    fn sse_events_carry_progressive_cursors() {
        let start = Cursor(smallvec::smallvec![MessageId::ZERO], None);
        let found = [(0, msg("a", 1, "1")), (0, msg("a", 2, "2"))];
        let a = Answer::build(Format::Sse, &start, false, &found);
        let text = std::str::from_utf8(&a.body).unwrap();
        assert!(text.starts_with("id: 1-0\ndata: {"), "{text}");
        assert!(text.contains("\n\nid: 2-0\ndata: "), "{text}");
        let raw = Answer::build(Format::Raw, &start, false, &found[..1]);
        assert_eq!(&raw.body[..], b"1");
    }
}
