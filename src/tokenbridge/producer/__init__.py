"""Producer: runs generations and writes their events to Redis."""
