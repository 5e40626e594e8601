-- Jobs that one instance among several should run (pruning the change feed): the holder
-- renews its lease each run; another instance takes it over only once it has run out.
CREATE TABLE job_leases (
    name TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    until_at TEXT NOT NULL
);
CREATE INDEX changes_created ON changes (created_at)
