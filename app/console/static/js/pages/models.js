// Models (teachers, trainable students): upload with format / task / architecture; what inspection found.

import {catalogPage, choice, textInput} from "../catalog.js";
import {fmtNum} from "../dom.js";

export function render(view) {
  return catalogPage(view, {
    title: "Models", path: "v1/models", noun: "model",
    uploadFields: (caps) => [
      ["Name", textInput("name", {required: true})],
      ["Format", choice("format", caps.model_formats || [], "detect from the content")],
      ["Task", choice("task", caps.tasks || [], "classification (default)")],
      ["Architecture (JSON)", textInput("architecture", {placeholder: '{"family": "mlp", "in_features": 64, '
        + '"hidden": [256], "out_features": 10}'}, true), "Required for safetensors: a built-in family and its arguments"],
    ],
    columns: [["Format", (r) => r.format], ["Task", (r) => r.task], ["Parameters", (r) => fmtNum(r.num_parameters)]],
    inspected: (r) => ({format: r.format, task: r.task, num_parameters: r.num_parameters,
                        architecture: r.architecture, io_schema: r.io_schema}),
  });
}
