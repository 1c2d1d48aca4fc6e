{{/* Names ---------------------------------------------------------------------------------- */}}
{{- define "coc.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "coc.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "coc.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "coc.selectorLabels" -}}
{{- /* quoted: a release (or nameOverride) named 2024 or true would be a number or a boolean to
       YAML, and the API server refuses a label value that is not a string */}}
app.kubernetes.io/name: {{ include "coc.name" . | quote }}
app.kubernetes.io/instance: {{ .Release.Name | quote }}
{{- end }}

{{- define "coc.labels" -}}
helm.sh/chart: {{ include "coc.chart" . }}
{{ include "coc.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/component: worker
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "coc.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "coc.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "coc.image" -}}
{{- $tag := default .Chart.AppVersion .Values.image.tag }}
{{- if .Values.image.digest }}
{{- printf "%s:%s@%s" .Values.image.repository $tag .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository $tag }}
{{- end }}
{{- end }}

{{/* The Secret the credential files come from: the user's, or the one this chart makes. */}}
{{- define "coc.secretName" -}}
{{- default (include "coc.fullname" .) .Values.secrets.existingSecret }}
{{- end }}

{{/* Numbers: values arrive as float64, and 1048576 would print as 1.048576e+06. */}}
{{- define "coc.num" -}}
{{- if eq (float64 .) (floor .) }}{{ int64 . }}{{ else }}{{ . }}{{ end }}
{{- end }}

{{/* Which credential files the pod needs: a list of [settings name, secret key, file name]. */}}
{{- define "coc.secretFiles" -}}
{{- $k := .Values.secrets.keys }}
{{- $files := list }}
{{- if eq .Values.api.auth "aksk" }}
{{- $files = append $files (list "API_AK" $k.apiAk "api-ak") }}
{{- $files = append $files (list "API_SK" $k.apiSk "api-sk") }}
{{- else }}
{{- $files = append $files (list "API_TOKEN" $k.apiToken "api-token") }}
{{- end }}
{{- if hasPrefix "SASL" .Values.kafka.securityProtocol }}
{{- $files = append $files (list "KAFKA_SASL_PASSWORD" $k.kafkaSaslPassword "kafka-sasl-password") }}
{{- end }}
{{- if include "coc.kafkaKeyPassword" . }}
{{- $files = append $files (list "KAFKA_SSL_KEY_PASSWORD" $k.kafkaSslKeyPassword "kafka-ssl-key-password") }}
{{- end }}
{{- toJson $files }}
{{- end }}

{{/* Whether the Kafka client key is encrypted, its password then in the Secret (with the
certificate's Secret only: without it there is no key to open). */}}
{{- define "coc.kafkaKeyPassword" -}}
{{- if and .Values.kafka.ssl.clientSecret.name .Values.kafka.ssl.clientSecret.encryptedKey }}true{{ end }}
{{- end }}

{{- define "coc.redisUrlFromSecret" -}}
{{- if and (eq .Values.dedup.backend "redis") (not .Values.dedup.redis.url) }}true{{ end }}
{{- end }}

{{- define "coc.dedupUrl" -}}
{{- if eq .Values.dedup.backend "sqlite" }}sqlite:////data/dedup.sqlite3
{{- else if eq .Values.dedup.backend "memory" }}memory://
{{- else }}{{ .Values.dedup.redis.url }}
{{- end }}
{{- end }}

{{/* Kubernetes waits this long after SIGTERM: the worker's own grace, then the 20 s its shutdown
may still take by design (5 s to abandon unfinished work, then at most 5 s for each broker step:
final commit, leaving the group, the producer), then terminationGraceExtraS for the rest: ~0.5 s
the drain may overrun the grace, ~2 s handing on claims, ~2 s stopping the HTTP server (a worst
case of ~24.5 s after the grace), and closing the API client and the dedup store. */}}
{{- define "coc.terminationGracePeriodSeconds" -}}
{{- add (ceil .Values.worker.shutdownGraceS | int64) 20 (.Values.terminationGraceExtraS | int64) }}
{{- end }}

{{/* Whether a required pod anti-affinity keeps two pods of the release off one node (or zone):
the preset podAntiAffinity=hard, or required terms in a user-given affinity. */}}
{{- define "coc.hardAntiAffinity" -}}
{{- if .Values.affinity }}
{{- if dig "podAntiAffinity" "requiredDuringSchedulingIgnoredDuringExecution" list .Values.affinity }}true{{ end }}
{{- else if eq .Values.podAntiAffinity "hard" }}true
{{- end }}
{{- end }}

{{/* The Deployment's update: Recreate with a store of the pod's own (sqlite, memory) or a PVC,
else a rolling update, as JSON {"type": ..., "maxSurge": ..., "maxUnavailable": ...}. Unset
(null), maxSurge is 1 and maxUnavailable 0; with a hard anti-affinity 0 and 1: a surge pod has no
node to go to when every node already runs a pod of the release, and the rollout would wait for
ever. */}}
{{- define "coc.updateStrategy" -}}
{{- $v := .Values }}
{{- if or (eq $v.persistence.type "pvc") (ne $v.dedup.backend "redis") }}
{{- toJson (dict "type" "Recreate") }}
{{- else }}
{{- $hard := include "coc.hardAntiAffinity" . }}
{{- $u := $v.updateStrategy | default dict }}
{{- $surge := ternary 0 1 (eq $hard "true") }}
{{- if not (kindIs "invalid" $u.maxSurge) }}{{ $surge = $u.maxSurge }}{{ end }}
{{- $unavailable := ternary 1 0 (eq $hard "true") }}
{{- if not (kindIs "invalid" $u.maxUnavailable) }}{{ $unavailable = $u.maxUnavailable }}{{ end }}
{{- if not (kindIs "string" $surge) }}{{ $surge = $surge | int64 }}{{ end }}
{{- if not (kindIs "string" $unavailable) }}{{ $unavailable = $unavailable | int64 }}{{ end }}
{{- toJson (dict "type" "RollingUpdate" "maxSurge" $surge "maxUnavailable" $unavailable) }}
{{- end }}
{{- end }}

{{/* A Go/Prometheus duration of the schema's units (ms, s, m, h; "1m30s" too) in milliseconds. */}}
{{- define "coc.durationMs" -}}
{{- $ms := 0 }}
{{- $units := dict "ms" 1 "s" 1000 "m" 60000 "h" 3600000 }}
{{- range $part := regexFindAll "[0-9]+(ms|s|m|h)" (toString .) -1 }}
{{- $ms = add $ms (mul (regexFind "^[0-9]+" $part | int64) (get $units (regexReplaceAll "^[0-9]+" $part ""))) }}
{{- end }}
{{- $ms }}
{{- end }}

{{/* The port of a URL's host[:port] (urlParse's "host"), or the given default. */}}
{{- define "coc.urlPort" -}}
{{- $port := regexFind ":[0-9]+$" (index . 0) | trimPrefix ":" }}
{{- default (index . 1) $port }}
{{- end }}

{{- define "coc.kedaMaxReplicas" -}}
{{- $max := .Values.autoscaling.keda.maxReplicaCount | int64 }}
{{- if eq $max 0 }}{{ .Values.kafka.inputTopicPartitions | int64 }}{{ else }}{{ $max }}{{ end }}
{{- end }}

{{/* The most replicas this release can ever run: never above the input topic's partitions. */}}
{{- define "coc.maxReplicas" -}}
{{- if .Values.autoscaling.keda.enabled }}{{ include "coc.kedaMaxReplicas" . }}
{{- else if .Values.autoscaling.hpa.enabled }}{{ .Values.autoscaling.hpa.maxReplicas | int64 }}
{{- else }}{{ .Values.replicaCount | int64 }}
{{- end }}
{{- end }}

{{/* The fewest replicas this release runs (0: KEDA may scale to zero). */}}
{{- define "coc.minReplicas" -}}
{{- if .Values.autoscaling.keda.enabled }}{{ .Values.autoscaling.keda.minReplicaCount | int64 }}
{{- else if .Values.autoscaling.hpa.enabled }}{{ .Values.autoscaling.hpa.minReplicas | int64 }}
{{- else }}{{ .Values.replicaCount | int64 }}
{{- end }}
{{- end }}

{{/* Contradictions the schema cannot express: fail the render with a message naming the values. */}}
{{- define "coc.validate" -}}
{{- $v := .Values }}
{{- $partitions := $v.kafka.inputTopicPartitions | int64 }}
{{- if and $v.autoscaling.hpa.enabled $v.autoscaling.keda.enabled }}
{{- fail "autoscaling.hpa.enabled and autoscaling.keda.enabled are exclusive: enable one" }}
{{- end }}
{{- if and (not $v.autoscaling.hpa.enabled) (not $v.autoscaling.keda.enabled) (gt ($v.replicaCount | int64) $partitions) }}
{{- fail (printf "replicaCount (%d) is above kafka.inputTopicPartitions (%d): extra consumers would sit idle" ($v.replicaCount | int64) $partitions) }}
{{- end }}
{{- if $v.autoscaling.hpa.enabled }}
{{- if gt ($v.autoscaling.hpa.maxReplicas | int64) $partitions }}
{{- fail (printf "autoscaling.hpa.maxReplicas (%d) is above kafka.inputTopicPartitions (%d)" ($v.autoscaling.hpa.maxReplicas | int64) $partitions) }}
{{- end }}
{{- if gt ($v.autoscaling.hpa.minReplicas | int64) ($v.autoscaling.hpa.maxReplicas | int64) }}
{{- fail "autoscaling.hpa.minReplicas is above autoscaling.hpa.maxReplicas" }}
{{- end }}
{{- if not (and $v.resources.requests $v.resources.requests.cpu) }}
{{- fail "autoscaling.hpa needs resources.requests.cpu (utilisation is relative to it)" }}
{{- end }}
{{- end }}
{{- if $v.autoscaling.keda.enabled }}
{{- $kmax := include "coc.kedaMaxReplicas" . | int64 }}
{{- if gt $kmax $partitions }}
{{- fail (printf "autoscaling.keda.maxReplicaCount (%d) is above kafka.inputTopicPartitions (%d)" $kmax $partitions) }}
{{- end }}
{{- if gt ($v.autoscaling.keda.minReplicaCount | int64) $kmax }}
{{- fail "autoscaling.keda.minReplicaCount is above the maximum replica count" }}
{{- end }}
{{- end }}
{{- if hasPrefix "SASL" $v.kafka.securityProtocol }}
{{- if not $v.kafka.sasl.mechanism }}
{{- fail (printf "kafka.sasl.mechanism is required with kafka.securityProtocol=%s" $v.kafka.securityProtocol) }}
{{- end }}
{{- if not $v.kafka.sasl.username }}
{{- fail (printf "kafka.sasl.username is required with kafka.securityProtocol=%s" $v.kafka.securityProtocol) }}
{{- end }}
{{- end }}
{{- if gt (mul ($v.kafka.heartbeatIntervalMs | int64) 3) ($v.kafka.sessionTimeoutMs | int64) }}
{{- fail "kafka.heartbeatIntervalMs must be at most a third of kafka.sessionTimeoutMs" }}
{{- end }}
{{- if and $v.kafka.ssl.clientSecret.name (not (has $v.kafka.securityProtocol (list "SSL" "SASL_SSL"))) }}
{{- fail (printf "kafka.ssl.clientSecret.name is set with kafka.securityProtocol=%s, which uses no TLS: the certificate would not be shown, and a broker that wants one only closes every connection; use SSL or SASL_SSL" $v.kafka.securityProtocol) }}
{{- end }}
{{- if and $v.kafka.ssl.clientSecret.encryptedKey (not $v.kafka.ssl.clientSecret.name) }}
{{- fail "kafka.ssl.clientSecret.encryptedKey needs kafka.ssl.clientSecret.name: a key password opens no key without the certificate's Secret" }}
{{- end }}
{{- if and $v.secrets.kafkaSslKeyPassword (not (include "coc.kafkaKeyPassword" .)) }}
{{- fail "secrets.kafkaSslKeyPassword is set, but the chart passes it only with kafka.ssl.clientSecret.name and kafka.ssl.clientSecret.encryptedKey: true" }}
{{- end }}
{{- if $v.dedup.redis.passwordSecret.name }}
{{- if ne $v.dedup.backend "redis" }}
{{- fail (printf "dedup.redis.passwordSecret.name is set with dedup.backend=%s: it is a Redis password, and the worker refuses COC_WORKER_DEDUP_REDIS_PASSWORD_FILE without a Redis store" $v.dedup.backend) }}
{{- end }}
{{- if not $v.dedup.redis.url }}
{{- fail "dedup.redis.passwordSecret needs dedup.redis.url (without credentials): the Secret gives the password only, the URL where Redis is" }}
{{- end }}
{{- end }}
{{- if $v.secrets.existingSecret }}
{{- range $key := list "apiAk" "apiSk" "apiToken" "kafkaSaslPassword" "kafkaSslKeyPassword" "redisUrl" }}
{{- if index $v.secrets $key }}
{{- fail (printf "secrets.%s is set together with secrets.existingSecret: put it in that Secret instead" $key) }}
{{- end }}
{{- end }}
{{- else if and (include "coc.redisUrlFromSecret" .) (not $v.secrets.redisUrl) }}
{{- fail "dedup.backend=redis needs dedup.redis.url, secrets.redisUrl or secrets.existingSecret" }}
{{- end }}
{{- /* Values the worker cannot start without: the pod would render, then crash-loop. */}}
{{- if not (or $v.api.endpoint $v.api.region) }}
{{- fail "set api.endpoint or api.region: the worker exits at start without either (\"set COC_WORKER_API_ENDPOINT or COC_WORKER_API_REGION\")" }}
{{- end }}
{{- if not $v.secrets.existingSecret }}
{{- /* The chart-made Secret holds only the credentials the configuration uses (coc.secretFiles),
       and the worker reads only those: each must be there, and a strong one as long as the worker
       wants it (settings.py MIN_SECRET_CHARS: "a short secret is guessable"). Measured as the
       worker does, in characters once trimmed (it strips a file's content); a value is never
       printed, only the name and the length. */}}
{{- $needs := list }}
{{- $why := printf "api.auth=%s" $v.api.auth }}
{{- if eq $v.api.auth "aksk" }}
{{- $needs = append $needs (list "apiAk" $why false) }}
{{- $needs = append $needs (list "apiSk" $why true) }}
{{- else }}
{{- $needs = append $needs (list "apiToken" $why true) }}
{{- end }}
{{- if hasPrefix "SASL" $v.kafka.securityProtocol }}
{{- $needs = append $needs (list "kafkaSaslPassword" (printf "kafka.securityProtocol=%s" $v.kafka.securityProtocol) true) }}
{{- end }}
{{- if include "coc.kafkaKeyPassword" . }}
{{- $needs = append $needs (list "kafkaSslKeyPassword" "kafka.ssl.clientSecret.encryptedKey=true" true) }}
{{- end }}
{{- range $need := $needs }}
{{- $key := index $need 0 }}
{{- $value := index $v.secrets $key | default "" | toString | trim }}
{{- if not $value }}
{{- fail (printf "set secrets.%s: %s needs it in the chart-made Secret, and the worker cannot start without it (or point secrets.existingSecret at a Secret you manage)" $key (index $need 1)) }}
{{- end }}
{{- $chars := regexFindAll "(?s)." $value -1 | len }}
{{- if and (index $need 2) (lt $chars 8) }}
{{- fail (printf "secrets.%s has %d characters: the worker refuses a secret of fewer than 8 (\"a short secret is guessable, and cannot be told apart from ordinary text in logs\")" $key $chars) }}
{{- end }}
{{- end }}
{{- end }}
{{- $storeDiesWithThePod := or (eq $v.dedup.backend "memory") (and (eq $v.dedup.backend "sqlite") (ne $v.persistence.type "pvc")) }}
{{- if and $v.autoscaling.keda.enabled (eq ($v.autoscaling.keda.minReplicaCount | int64) 0) $storeDiesWithThePod }}
{{- fail (printf "autoscaling.keda.minReplicaCount=0 with dedup.backend=%s on persistence.type=%s: every scale to zero removes the pod and the dedup store with it, and the events it had applied would be sent again when read again; use persistence.type=pvc (sqlite) or dedup.backend=redis, or minReplicaCount 1" $v.dedup.backend $v.persistence.type) }}
{{- end }}
{{- if and (ne $v.dedup.backend "redis") (gt (include "coc.maxReplicas" . | int64) 1) }}
{{- fail (printf "dedup.backend=%s keeps each pod's own records: after a rebalance a pod would not know what another applied; run one replica or use dedup.backend=redis" $v.dedup.backend) }}
{{- end }}
{{- if lt ($v.dedup.leaseS | float64) (addf 2.0 (mulf 2.0 (addf ($v.api.connectTimeoutS | float64) ($v.api.requestTimeoutS | float64)))) }}
{{- fail "dedup.leaseS must be at least 2 x (api.connectTimeoutS + api.requestTimeoutS) + 2: a request may still land that long after it was sent, and until then no other pod may take the event over" }}
{{- end }}
{{- if lt ($v.retry.maxElapsedS | float64) (addf ($v.api.connectTimeoutS | float64) (mulf 2.0 ($v.api.requestTimeoutS | float64))) }}
{{- fail "retry.maxElapsedS must be at least api.connectTimeoutS + 2 x api.requestTimeoutS: a timed-out call takes up to both timeouts and the next attempt waits a request timeout for the API to settle" }}
{{- end }}
{{- if gt ($v.retry.retryAfterMaxS | float64) ($v.retry.maxElapsedS | float64) }}
{{- fail "retry.retryAfterMaxS must be at most retry.maxElapsedS: the worker refuses a Retry-After it may honour past the event's whole budget" }}
{{- end }}
{{- if or (eq $v.kafka.inputTopic $v.kafka.resultsTopic) (eq $v.kafka.inputTopic $v.kafka.dlqTopic) (eq $v.kafka.resultsTopic $v.kafka.dlqTopic) }}
{{- fail "kafka.inputTopic, kafka.resultsTopic and kafka.dlqTopic must be three different topics" }}
{{- end }}
{{- if has "." (list $v.kafka.inputTopic $v.kafka.resultsTopic $v.kafka.dlqTopic) }}
{{- fail "a topic cannot be named '.'" }}
{{- end }}
{{- if has ".." (list $v.kafka.inputTopic $v.kafka.resultsTopic $v.kafka.dlqTopic) }}
{{- fail "a topic cannot be named '..'" }}
{{- end }}
{{- if and (gt ($v.worker.maxBuffered | int64) 0) (lt ($v.worker.maxBuffered | int64) ($v.worker.maxInFlight | int64)) }}
{{- fail "worker.maxBuffered must be 0 (4 x maxInFlight) or at least worker.maxInFlight" }}
{{- end }}
{{- if and (gt ($v.worker.maxBufferedBytes | int64) 0) (lt ($v.worker.maxBufferedBytes | int64) 256) }}
{{- fail "worker.maxBufferedBytes must be 0 (64 MiB) or at least 256" }}
{{- end }}
{{- /* The budget binds hardest at the fewest replicas; a KEDA scaled to zero binds as soon as it
       wakes one pod. Kubernetes rounds a percentage up, of minAvailable as of maxUnavailable:
       minAvailable=50% of 1 pod is 1, and 67% of 3 is 3. */}}
{{- $pdb := $v.podDisruptionBudget }}
{{- $fewest := include "coc.minReplicas" . | int64 }}
{{- $pods := max $fewest 1 }}
{{- $replicas := printf "%d replica(s)" $pods }}
{{- if and (eq $fewest 0) $v.autoscaling.keda.enabled }}
{{- $replicas = "1 replica (autoscaling.keda.minReplicaCount=0: KEDA wakes one pod)" }}
{{- else if eq $fewest 0 }}
{{- $replicas = "1 replica (replicaCount=0, once scaled up)" }}
{{- end }}
{{- if $pdb.enabled }}
{{- if kindIs "invalid" $pdb.minAvailable }}
{{- $down := $pdb.maxUnavailable }}
{{- if kindIs "string" $down }}
{{- $down = div (add (mul (trimSuffix "%" $down | atoi) $pods) 99) 100 }}
{{- end }}
{{- if le ($down | int64) 0 }}
{{- fail (printf "podDisruptionBudget.maxUnavailable=%v never lets a pod be evicted: node drains and cluster upgrades would wait for ever" $pdb.maxUnavailable) }}
{{- end }}
{{- else }}
{{- $up := $pdb.minAvailable }}
{{- $rounded := "" }}
{{- if kindIs "string" $up }}
{{- $up = div (add (mul (trimSuffix "%" $up | atoi) $pods) 99) 100 }}
{{- $rounded = printf " (%s of %d rounds up to %d)" $pdb.minAvailable $pods $up }}
{{- end }}
{{- if ge ($up | int64) $pods }}
{{- fail (printf "podDisruptionBudget.minAvailable=%v with %s%s never lets a pod be evicted: node drains and cluster upgrades would wait for ever; use maxUnavailable" $pdb.minAvailable $replicas $rounded) }}
{{- end }}
{{- end }}
{{- end }}
{{- if and (eq $v.persistence.type "pvc") (gt (include "coc.maxReplicas" . | int64) 1) }}
{{- fail "persistence.type=pvc holds one pod's sqlite file: run one replica, or use dedup.backend=redis with an emptyDir" }}
{{- end }}
{{- if $v.networkPolicy.enabled }}
{{- if not $v.networkPolicy.kafka.peers }}
{{- fail "networkPolicy.enabled needs networkPolicy.kafka.peers (where the brokers are)" }}
{{- end }}
{{- if not $v.networkPolicy.api.peers }}
{{- fail "networkPolicy.enabled needs networkPolicy.api.peers (where the COC API is)" }}
{{- end }}
{{- if and (eq $v.dedup.backend "redis") (not $v.networkPolicy.redis.peers) }}
{{- fail "networkPolicy.enabled with dedup.backend=redis needs networkPolicy.redis.peers" }}
{{- end }}
{{- /* Each port the worker connects to must be in its egress rule's ports, or the policy blocks
       it and the pod crash-loops (startupWaitS, then exit 1). */}}
{{- $np := $v.networkPolicy }}
{{- $kafkaPorts := list }}
{{- range $np.kafka.ports }}{{ $kafkaPorts = append $kafkaPorts (. | int64 | toString) }}{{ end }}
{{- range $server := splitList "," $v.kafka.bootstrapServers }}
{{- $server = trim $server }}
{{- $port := regexFind "[0-9]+$" $server }}
{{- if and $server (not (has $port $kafkaPorts)) }}
{{- fail (printf "kafka.bootstrapServers names %s, but networkPolicy.kafka.ports (%s) has no %s: the NetworkPolicy would block the brokers; add %s to networkPolicy.kafka.ports" $server (join ", " $kafkaPorts) $port $port) }}
{{- end }}
{{- end }}
{{- /* The region's endpoints are all https (worker/settings.py COC_REGION_ENDPOINTS). Through an
       egress proxy (extraEnv) the worker connects to the proxy instead, whose port the chart does
       not know: networkPolicy.api then describes the proxy, and is not checked. */}}
{{- $endpoint := urlParse (default "https://coc.myhuaweicloud.com" $v.api.endpoint) }}
{{- $proxyVariables := list "ALL_PROXY" (printf "%s_PROXY" (upper $endpoint.scheme)) }}
{{- $proxied := false }}
{{- range $v.extraEnv }}{{ if has (upper (toString .name)) $proxyVariables }}{{ $proxied = true }}{{ end }}{{ end }}
{{- $apiPort := include "coc.urlPort" (list $endpoint.host (ternary "443" "80" (eq $endpoint.scheme "https"))) }}
{{- $apiPorts := list }}
{{- range $np.api.ports }}{{ $apiPorts = append $apiPorts (. | int64 | toString) }}{{ end }}
{{- if and (not $proxied) (not (has $apiPort $apiPorts)) }}
{{- $which := ternary (printf "api.endpoint %s" $v.api.endpoint) (printf "api.region %s (https)" $v.api.region) (ne $v.api.endpoint "") }}
{{- fail (printf "%s is on port %s, but networkPolicy.api.ports (%s) has no %s: the NetworkPolicy would block the COC API; add %s to networkPolicy.api.ports" $which $apiPort (join ", " $apiPorts) $apiPort $apiPort) }}
{{- end }}
{{- /* A Redis URL in the ConfigMap only: one from a Secret is not the chart's to read. */}}
{{- if and (eq $v.dedup.backend "redis") $v.dedup.redis.url }}
{{- $redisPort := include "coc.urlPort" (list (urlParse $v.dedup.redis.url).host "6379") }}
{{- $redisPorts := list }}
{{- range $np.redis.ports }}{{ $redisPorts = append $redisPorts (. | int64 | toString) }}{{ end }}
{{- if not (has $redisPort $redisPorts) }}
{{- fail (printf "dedup.redis.url is on port %s, but networkPolicy.redis.ports (%s) has no %s: the NetworkPolicy would block Redis; add %s to networkPolicy.redis.ports" $redisPort (join ", " $redisPorts) $redisPort $redisPort) }}
{{- end }}
{{- end }}
{{- end }}
{{- /* A rolling update must be allowed to replace a pod: Kubernetes refuses both at zero. */}}
{{- $strategy := include "coc.updateStrategy" . | fromJson }}
{{- if eq $strategy.type "RollingUpdate" }}
{{- if and (has (toString $strategy.maxSurge) (list "0" "0%")) (has (toString $strategy.maxUnavailable) (list "0" "0%")) }}
{{- fail "updateStrategy.maxSurge and updateStrategy.maxUnavailable are both 0 (with a hard pod anti-affinity maxSurge defaults to 0): a rolling update could replace no pod, and Kubernetes refuses the Deployment; set updateStrategy.maxUnavailable to 1 (or maxSurge, if a node is free for the surge pod)" }}
{{- end }}
{{- end }}
{{- if $v.serviceMonitor.enabled }}
{{- $interval := include "coc.durationMs" $v.serviceMonitor.interval | int64 }}
{{- $timeout := include "coc.durationMs" $v.serviceMonitor.scrapeTimeout | int64 }}
{{- if gt $timeout $interval }}
{{- fail (printf "serviceMonitor.scrapeTimeout (%s) is longer than serviceMonitor.interval (%s): Prometheus refuses a scrape timeout above its interval; lower serviceMonitor.scrapeTimeout" $v.serviceMonitor.scrapeTimeout $v.serviceMonitor.interval) }}
{{- end }}
{{- end }}
{{- /* The pod template carries the selector's labels, then podLabels: one of the same name would
       be a second key there (the later one wins), and a Deployment whose pods do not match its
       selector is refused (nor would the Service, the PDB or KEDA find them). */}}
{{- $podLabels := $v.podLabels | default dict }}
{{- range $name, $value := include "coc.selectorLabels" . | fromYaml }}
{{- if hasKey $podLabels $name }}
{{- fail (printf "podLabels sets %s, a selector label the chart sets itself (%s=%s): remove it from podLabels" $name $name $value) }}
{{- end }}
{{- end }}
{{- end }}
