BROKER={{ base }}
# 1. Log the device in once; keep the token (it is shown only now).
TOKEN=$(curl -s -X POST "$BROKER/api/v1/auth/tokens" -H 'Content-Type: application/json' \
  -d '{"username": "ana", "password": "…", "device_name": "My phone"}' | jq -r .token)

# 2. Ask for an upload URL. One Idempotency-Key per upload, sent again on every retry.
KEY=$(uuidgen)
curl -s -X POST "$BROKER/api/v1/uploads" -H "Authorization: Bearer $TOKEN" \
  -H "Idempotency-Key: $KEY" -H 'Content-Type: application/json' \
  -d '{"metadata": {"album": "summer"}}' > upload.json
ID=$(jq -r .id upload.json)
UPLOAD_URL=$(jq -r .upload_url upload.json)

# 3. Send the file straight to Cloudflare: one multipart POST, field "file", no token.
curl -s -F file=@photo.jpg "$UPLOAD_URL"

# 4. Say you are done: 200 once it is ready, 202 while it is checked (ask again after Retry-After).
curl -s -i -X POST "$BROKER/api/v1/uploads/$ID/complete" -H "Authorization: Bearer $TOKEN"

# 5. A signed URL to show it.
curl -s "$BROKER/api/v1/images/$ID/url?variant={{ variant }}" -H "Authorization: Bearer $TOKEN"
