// SPDX-License-Identifier: GPL-3.0-or-later
// Flamenco 3 custom job type: matte a shot with `oavm batch`, one task per frame chunk.
// Put this file in the Manager's `scripts/` folder. Each task depends on the previous one, so a chunk starts
// from the clip state the chunk before it saved (see README.md).

const JOB_TYPE = {
  label: "OAVM Matte",
  settings: [
    { key: "input", type: "string", required: true,
      description: "Plate sequence or movie, e.g. /shots/010/plate/plate.####.exr" },
    { key: "mask", type: "string", required: true,
      description: "Keyframe mask as FRAME=PATH, e.g. 1001=/shots/010/roto/mask.1001.png" },
    { key: "output", type: "string", required: true,
      description: "Matte sequence, e.g. /shots/010/matte/matte.####.exr" },
    { key: "frames", type: "string", required: true, description: "Frame range, e.g. 1001-1100" },
    { key: "chunk_size", type: "int32", default: 50, description: "Frames per task" },
    { key: "oavm", type: "string", default: "oavm", description: "The oavm executable on the Workers" },
  ],
};

function compileJob(job) {
  const s = job.settings;
  let previous = null;
  for (const chunk of frameChunker(s.frames, s.chunk_size)) {
    const task = author.Task(`matte-${chunk}`, "misc");
    task.addCommand(author.Command("exec", {
      exe: s.oavm,
      args: ["batch", "--input", s.input, "--mask", s.mask, "--frames", chunk, "--output", s.output,
             "--state-every", "25"],
    }));
    if (previous) {
      task.addDependency(previous);
    }
    job.addTask(task);
    previous = task;
  }
}
