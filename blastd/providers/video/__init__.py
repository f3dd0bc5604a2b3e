"""Video render adapters: D-ID and a configurable generic video-job API."""
