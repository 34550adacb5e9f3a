//! Convert (to be written).
