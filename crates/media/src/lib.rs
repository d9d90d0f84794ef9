//! vidgen-media: video files from decoded frames, and the quality guard.
