//! Flow-matching schedulers behind one step interface.
