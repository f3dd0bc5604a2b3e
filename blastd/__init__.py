"""blastd: a crash-safe WhatsApp blast and video delivery daemon."""
