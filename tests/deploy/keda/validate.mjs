// Validate ScaledObjects with @kubernetes-models/keda, whose validators are generated
// from KEDA's own Go API types (github.com/kedacore/keda/v2/apis/keda/v1alpha1).
// stdin: a JSON array of objects; stdout: a JSON array, one error message (or null) each.
import { readFileSync } from "node:fs";
import { ScaledObject } from "@kubernetes-models/keda/keda.sh/v1alpha1";

const docs = JSON.parse(readFileSync(0, "utf8"));
const errors = docs.map((doc) => {
  try {
    new ScaledObject(doc).validate();
    return null;
  } catch (err) {
    return String(err.message);
  }
});
process.stdout.write(JSON.stringify(errors));
