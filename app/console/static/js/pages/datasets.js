// Datasets: upload with format, label column and input names; what inspection found (rows, labels, schema).

import {catalogPage, choice, textInput} from "../catalog.js";
import {fmtNum} from "../dom.js";

export function render(view) {
  return catalogPage(view, {
    title: "Datasets", path: "v1/datasets", noun: "dataset",
    uploadFields: (caps) => [
      ["Name", textInput("name", {required: true})],
      ["Format", choice("format", caps.dataset_formats || [])],
      ["Label column", textInput("label_column"), "csv / parquet: the column holding the labels"],
      ["Inputs (JSON list)", textInput("inputs", {placeholder: '["input_ids", "attention_mask"]'}),
       "npz with several model inputs: the arrays fed to the model"],
      ["Options (JSON)", textInput("options", {placeholder: '{"image_size": 32}'}, true), "image_folder options"],
    ],
    columns: [["Format", (r) => r.format], ["Rows", (r) => fmtNum(r.num_rows)],
              ["Labels", (r) => (r.has_labels ? "yes" : "no")]],
    inspected: (r) => ({format: r.format, num_rows: r.num_rows, has_labels: r.has_labels, schema: r.schema}),
  });
}
