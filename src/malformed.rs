//! The request parsers' one error, [`Malformed`]: a target, a cursor or
//! another part of a request that does not parse. The request layer
//! answers it with a 400 `bad_request` (`RequestError::BadRequest`, by
//! `From`).

/// What is malformed, and how: the detail of the 400 answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Malformed(pub String);
