//! The subject policy: who may publish, request and subscribe to which subjects.

pub mod subjects;
