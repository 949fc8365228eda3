-- A backend that has described a table for idem_upsert exits cleanly when
-- the client disconnects at the end of this file: scripts/installcheck
-- fails the run if the server log shows it crashed. (The order matters: a
-- table created after the first call of the extension and before the
-- first upsert.)
SELECT idem_once('exit:warm-up');
CREATE TABLE exit_target (id int PRIMARY KEY, v numeric);
SELECT idem_upsert('exit_target', '{"id": 1, "v": 1}');
SELECT idem_upsert('exit_target', '{"id": 1, "v": 2}');
DELETE FROM idempotency.once WHERE key = 'exit:warm-up';
