-- One row per deleted job: the highest fencing token the store had seen for
-- the job when delete_job_outputs or delete_tenant_outputs removed its parts.
-- Deleting a job's parts would otherwise forget its tokens, and a worker
-- that lost its lease (a zombie, old token) could open and finalize a new
-- part of the deleted job. With fencing on, open_writer and finalize_part
-- refuse a key of the job whose token is not greater than fencing_token; a
-- later claim (a higher token) may still write the job.
--
-- fencing_token uses the same order-preserving u64 -> i64 mapping as
-- parts.fencing_token. recorded_at_ms (unix milliseconds) is when the mark
-- was last raised; maintenance drops marks that have grown old.
CREATE TABLE job_fences (
    tenant_id      TEXT    NOT NULL,
    job_id         TEXT    NOT NULL,
    fencing_token  INTEGER NOT NULL,
    recorded_at_ms INTEGER NOT NULL,
    PRIMARY KEY (tenant_id, job_id)
);

-- Old marks are found by age.
CREATE INDEX job_fences_by_age ON job_fences (recorded_at_ms);
