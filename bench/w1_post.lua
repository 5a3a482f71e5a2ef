-- wrk script for W1 (bench/w1_http.sh): every request is a POST of the same
-- 256-byte body to the stream named on wrk's command line.
wrk.method = "POST"
wrk.body = string.rep("x", 256)
wrk.headers["Content-Type"] = "application/octet-stream"
