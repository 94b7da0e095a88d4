//! The HTTP download server (being written).
