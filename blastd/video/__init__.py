"""The video pipeline: video_blast and video_poll jobs, their renders, polling and delivery."""
