//! The app's screens.

pub mod chat;
pub mod models;
