//! One module per screen.

pub mod adapt;
pub mod arena;
pub mod connect;
pub mod datasets;
pub mod docs;
pub mod library;
pub mod playground;
pub mod runs;
pub mod targets;
pub mod templates;
pub mod welcome;
