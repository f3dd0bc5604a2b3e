-- The video pipeline (docs/video.md). A video recipient goes pending -> rendering (its
-- render submitted, or being submitted while owner is set and video_job_id still NULL) ->
-- rendered (video_url known) -> sending -> sent ..., or ends video_failed. A video_poll
-- campaign has one recipient, the chat, inserted straight into rendering.
ALTER TABLE recipients
    ADD COLUMN video_job_id       text,          -- the provider's job id
    ADD COLUMN video_url          text,          -- the finished clip's link
    ADD COLUMN render_started_at  timestamptz,   -- the give-up clock of the render starts here
    ADD COLUMN rendered_at        timestamptz,
    ADD COLUMN renders            integer NOT NULL DEFAULT 0,  -- submissions made for it
    ADD COLUMN notice             text;          -- a failure notice: 'sent' or why it was not

CREATE INDEX recipients_by_video_job ON recipients (video_job_id)
    WHERE video_job_id IS NOT NULL;
CREATE INDEX recipients_rendering ON recipients (campaign_id, id)
    WHERE state IN ('rendering', 'rendered');
-- The latest render times, which the adaptive polling schedule starts from after a restart.
CREATE INDEX recipients_rendered_at ON recipients (rendered_at) WHERE rendered_at IS NOT NULL;
