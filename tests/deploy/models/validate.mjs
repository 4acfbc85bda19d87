// Validate custom resources with @kubernetes-models, whose validators are generated from
// each project's own Go API types: KEDA (github.com/kedacore/keda/v2/apis/keda/v1alpha1)
// and the Prometheus operator (monitoring.coreos.com/v1).
// stdin: a JSON array of objects; stdout: a JSON array, one error message (or null) each.
import { readFileSync } from "node:fs";
import { ScaledObject } from "@kubernetes-models/keda/keda.sh/v1alpha1";
import {
  PodMonitor,
  PrometheusRule,
} from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1";

const MODELS = new Map([
  ["keda.sh/v1alpha1 ScaledObject", ScaledObject],
  ["monitoring.coreos.com/v1 PodMonitor", PodMonitor],
  ["monitoring.coreos.com/v1 PrometheusRule", PrometheusRule],
]);

const docs = JSON.parse(readFileSync(0, "utf8"));
const errors = docs.map((doc) => {
  const Model = MODELS.get(`${doc.apiVersion} ${doc.kind}`);
  if (Model === undefined) {
    return `no model for ${doc.apiVersion} ${doc.kind}`;
  }
  try {
    new Model(doc).validate();
    return null;
  } catch (err) {
    return String(err.message);
  }
});
process.stdout.write(JSON.stringify(errors));
